# frozen_string_literal: true

module Prosody
  # A Kafka client: sends messages and, with a +group_id+ and +subscribed_topics+, consumes them
  # through a {Prosody::EventHandler}.
  #
  # Every option falls back to its +PROSODY_*+ environment variable, then to its default (see
  # the README's configuration reference). Unknown options and bad values raise ArgumentError.
  class Client
    ACTIVE = {}.compare_by_identity
    ACTIVE_LOCK = Mutex.new
    private_constant :ACTIVE, :ACTIVE_LOCK

    # Unsubscribes every subscribed client (run at exit so in-flight work is committed).
    #
    # @api private
    def self.unsubscribe_all
      ACTIVE_LOCK.synchronize { ACTIVE.keys }.each(&:unsubscribe)
    end

    # @param options [Hash, nil] options as a Hash (String or Symbol keys)
    # @param kwargs [Hash] options as keywords
    # @raise [ArgumentError] on an unknown option or a bad value, naming it
    def initialize(options = nil, **kwargs)
      unless options.nil? || options.is_a?(Hash)
        raise ArgumentError, "options must be a Hash or keywords, got #{options.class}"
      end

      merged = {}
      (options || {}).merge(kwargs).each { |k, v| merged[k.to_s] = v }
      Prosody.start_log_pump
      @native = Native::Client.new(merged)
      @lock = Mutex.new
      @processor = nil
    end

    # Sends one message and returns once the broker acknowledged it.
    #
    # @param topic [String] destination topic
    # @param key [String] record key; messages of one key are handled in order
    # @param payload [Hash, Array, String, Numeric, true, false, nil] encoded as JSON
    # @param headers [Hash{String => String}] extra record headers
    # @return [void]
    # @raise [ArgumentError] on a bad topic, key, payload or headers
    # @raise [Prosody::SendError] if the broker did not acknowledge within +send_timeout+
    def send_message(topic, key, payload, headers: {})
      topic = string_arg("topic", topic)
      key = string_arg("key", key, allow_empty: true)
      raise ArgumentError, "headers must be a Hash, got #{headers.class}" unless headers.is_a?(Hash)

      @native.send_message(topic, key, encode(payload), headers)
      nil
    end

    # Starts consuming +subscribed_topics+ with +handler+.
    #
    # @param handler [Prosody::EventHandler] responds to +on_message(context, message)+
    # @return [void]
    # @raise [Prosody::SubscriptionError] when already subscribed or not configured to consume
    def subscribe(handler)
      unless handler.respond_to?(:on_message)
        raise ArgumentError, "handler must respond to on_message(context, message), got #{handler.class}"
      end

      if uses_timers?(handler) && !@native.timers_available?
        raise SubscriptionError, "#{handler.class} defines on_timer, and timers need a store: set " \
                                 "cassandra_nodes (or PROSODY_CASSANDRA_NODES), or use mock: true in tests"
      end

      @lock.synchronize do
        raise SubscriptionError, "already subscribed; call unsubscribe first" if @processor

        bridge = Native::Bridge.new
        processor = Processor.new(bridge, handler, @native.max_concurrency).start
        begin
          @native.subscribe(bridge)
        rescue Exception # rubocop:disable Lint/RescueException
          processor.stop
          raise
        end
        @processor = processor
        ACTIVE_LOCK.synchronize { ACTIVE[self] = true }
      end
      nil
    end

    # Stops consuming: in-flight handlers finish (cancelled near +shutdown_timeout+), offsets are
    # committed, the group is left, and every thread the subscription started ends.
    #
    # @return [void]
    # @raise [Prosody::SubscriptionError] when called from inside a handler
    def unsubscribe
      processor = @lock.synchronize do
        if @processor && Thread.current == @processor.thread
          raise SubscriptionError, "unsubscribe cannot be called from inside a handler"
        end

        @processor.tap { @processor = nil }
      end
      return nil unless processor

      @native.unsubscribe
      processor.stop
      ACTIVE_LOCK.synchronize { ACTIVE.delete(self) }
      nil
    end

    # @return [Symbol] +:unconfigured+ (no group or topics), +:configured+ or +:running+
    def consumer_state
      @native.consumer_state
    end

    # @return [String] value of the +source-system+ header on sent messages
    def source_system
      @native.source_system
    end

    # @return [Integer] partitions currently assigned to this client
    def assigned_partitions
      @native.assigned_partitions
    end

    # Whether an assigned partition has a message that has been waiting to finish (queued,
    # running or retrying) for longer than +stall_threshold+. False when not subscribed.
    #
    # @return [Boolean]
    def is_stalled? # rubocop:disable Naming/PredicateName -- the reference API's name
      @native.stalled?
    end

    # @return [String] a short description
    def inspect
      "#<#{self.class.name} group_id=#{@native.group_id.inspect} state=#{consumer_state.inspect}>"
    end

    private

    def uses_timers?(handler)
      handler.respond_to?(:uses_timers?) ? handler.uses_timers? : handler.respond_to?(:on_timer)
    end

    def string_arg(name, value, allow_empty: false)
      value = value.to_s if value.is_a?(Symbol)
      unless value.is_a?(String) && (allow_empty || !value.empty?)
        raise ArgumentError, "#{name} must be a #{allow_empty ? '' : 'non-empty '}String, got #{value.inspect}"
      end

      value
    end

    def encode(payload)
      JSON.generate(payload)
    rescue JSON::GeneratorError, JSON::NestingError, EncodingError => e
      raise ArgumentError, "payload cannot be encoded as JSON: #{e.message}"
    end
  end
end

at_exit { Prosody::Client.unsubscribe_all }

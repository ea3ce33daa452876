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
      ACTIVE_LOCK.synchronize { ACTIVE.keys }.reject(&:inherited?).each do |client|
        client.unsubscribe
      rescue Prosody::Error => e
        Prosody.log(Logger::ERROR, "at exit: #{e.message}")
      end
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
      @pid = Process.pid
      @lock = Mutex.new
      @processor = nil
      @stopping = nil # the processor an unsubscribe in progress is stopping
      @stopped = ConditionVariable.new # signalled when that unsubscribe finished
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

      native.send_message(topic, key, encode(payload), headers)
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

      if uses_timers?(handler) && !native.timers_available?
        raise SubscriptionError, "#{handler.class} defines on_timer, and timers need a store: set " \
                                 "cassandra_nodes (or PROSODY_CASSANDRA_NODES), or use mock: true in tests"
      end

      @lock.synchronize do
        raise SubscriptionError, "already subscribed; call unsubscribe first" if @processor

        bridge = Native::Bridge.new
        processor = Processor.new(bridge, handler, native.max_concurrency).start
        begin
          native.subscribe(bridge)
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
    # committed, the group is left, and every thread the subscription started ends. A call while
    # another thread is unsubscribing returns once that one finished.
    #
    # Safe in a signal trap handler, where Ruby allows no locks: there it hands the work to a new
    # thread and returns that thread at once; +join+ it outside the trap handler to wait.
    #
    # @return [nil, Thread] nil; from a trap handler, the Thread doing the work
    # @raise [Prosody::SubscriptionError] when called from inside a handler
    # @raise [Prosody::Error] after stopping, when a thread of the subscription (an engine thread,
    #   or the processor thread that runs handlers) had died (it was logged then, and
    #   {#is_stalled?} was true since)
    def unsubscribe
      native # raises in a forked child
      begin
        processor = claim_processor
      rescue ThreadError
        # Mutex#lock raises in trap context, and when the trap interrupted this thread while it
        # held the lock (in subscribe); a new thread can wait for the lock.
        return Thread.new { unsubscribe }.tap { |thread| thread.name = "prosody-unsubscribe" }
      end
      return nil unless processor

      begin
        begin
          native.unsubscribe
        rescue Prosody::Error => e
          failure = e # an engine thread had died; it is stopped now, and reported below
        end
        processor.stop
        ACTIVE_LOCK.synchronize { ACTIVE.delete(self) }
        report_failure(failure, processor.failure)
      ensure
        @lock.synchronize do
          @stopping = nil
          @stopped.broadcast
        end
      end
      nil
    end

    # @return [Symbol] +:unconfigured+ (no group or topics), +:configured+ or +:running+
    def consumer_state
      native.consumer_state
    end

    # @return [String] value of the +source-system+ header on sent messages
    def source_system
      native.source_system
    end

    # @return [Integer] partitions currently assigned to this client
    def assigned_partitions
      native.assigned_partitions
    end

    # Whether an assigned partition has a message that has been waiting to finish (queued,
    # running or retrying) for longer than +stall_threshold+. False when not subscribed.
    #
    # @return [Boolean]
    def is_stalled? # rubocop:disable Naming/PredicateName -- the reference API's name
      native.stalled? || !@processor&.failure.nil?
    end

    # @return [String] a short description
    def inspect
      return "#<#{self.class.name} created in process #{@pid}, unusable in this one>" if inherited?

      "#<#{self.class.name} group_id=#{native.group_id.inspect} state=#{consumer_state.inspect}>"
    end

    # Whether this client was created in another process, of which this one is a fork. Such a
    # client cannot be used here: its engine threads did not survive the fork.
    #
    # @api private
    # @return [Boolean]
    def inherited?
      Process.pid != @pid
    end

    private

    # The native client, unless this client was inherited through fork.
    def native
      return @native unless inherited?

      raise ClientError, "this Prosody::Client was created in process #{@pid}, and this is process " \
                         "#{Process.pid} (a fork): its threads did not survive the fork; create a new client after fork"
    end

    # Raises, once the subscription is stopped, what had gone wrong in it.
    def report_failure(engine_failure, processor_death)
      raise engine_failure if engine_failure
      return unless processor_death

      raise Prosody::Error, "the processor thread had died (#{processor_death.class}: #{processor_death.message}); " \
                            "its unfinished events were not committed and will be delivered again"
    end

    # Takes the processor to stop (nil when not subscribed), after any unsubscribe in progress.
    def claim_processor
      @lock.synchronize do
        running = @processor || @stopping
        if running && Thread.current == running.thread
          raise SubscriptionError, "unsubscribe cannot be called from inside a handler"
        end

        @stopped.wait(@lock) while @stopping
        @stopping = @processor.tap { @processor = nil }
      end
    end

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
      check_json(payload)
      JSON.generate(payload)
    rescue JSON::GeneratorError, JSON::NestingError, EncodingError => e
      raise ArgumentError, "payload cannot be encoded as JSON: #{e.message}"
    end

    # Only values that JSON represents as themselves are sent: anything else would go out as its
    # +to_s+ ("#<Object:0x...>"). Symbols are sent as Strings. The check allocates nothing; the
    # place of a bad value is worked out only for the error.
    def check_json(payload)
      raise ArgumentError, json_error(payload, "payload") unless json_value?(payload)
    end

    JSON_LEAVES = [String, Symbol, Integer, TrueClass, FalseClass, NilClass].freeze
    private_constant :JSON_LEAVES

    def json_value?(value)
      case value
      when *JSON_LEAVES then true
      when Float then value.finite?
      when Array then value.all? { |item| json_value?(item) }
      when Hash then value.all? { |k, v| json_entry?(k, v) }
      else false
      end
    end

    def json_entry?(key, value)
      json_key?(key) && json_value?(value)
    end

    def json_key?(key)
      key.is_a?(String) || key.is_a?(Symbol)
    end

    # Says where the first value that is not JSON sits, and why (nil when there is none).
    def json_error(value, where)
      case value
      when *JSON_LEAVES then nil
      when Float then "#{where} is #{value}, which JSON cannot represent" unless value.finite?
      when Array then first_error(value.each_with_index) { |item, i| json_error(item, "#{where}[#{i}]") }
      when Hash then first_error(value) { |k, v| json_entry_error(k, v, where) }
      else "#{where} is a #{value.class}, which is not a JSON value; send a Hash, Array, String, Symbol, " \
           "Integer, finite Float, true, false or nil (convert it first)"
      end
    end

    def json_entry_error(key, value, where)
      return "#{where} has the key #{key.inspect}; JSON object keys must be Strings or Symbols" unless json_key?(key)

      json_error(value, "#{where}[#{key.inspect}]")
    end

    def first_error(items, &block)
      items.each do |*args|
        error = block.call(*args)
        return error if error
      end
      nil
    end
  end
end

at_exit { Prosody::Client.unsubscribe_all }

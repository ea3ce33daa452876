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

    # Sends one message and returns once the broker acknowledged it. On a fiber of a running
    # Async reactor (any handler, or the application's own +Async+ block) only that fiber waits;
    # the reactor's other fibers keep running. On a thread without a reactor, the thread waits.
    #
    # @param topic [String] destination topic
    # @param key [String] record key; messages of one key are handled in order
    # @param payload [Hash, Array, String, Numeric, true, false, nil] encoded as JSON (+nil+ is
    #   JSON +null+; see {#send_tombstone} for a record with no value)
    # @param headers [Hash{String => String}] extra record headers
    # @param partition [Integer, nil] the partition to write; nil for the key's partition
    # @return [void]
    # @raise [ArgumentError] on a bad topic, key, payload, headers or partition
    # @raise [Prosody::SendError] if the broker did not acknowledge within +send_timeout+, naming
    #   the topic, the key and the reason
    def send_message(topic, key, payload, headers: {}, partition: nil)
      Native::Pending.await do |waiter|
        native.send_record(waiter, topic, key, payload, headers, partition, false, Tracing.current)
      end
      nil
    end

    # Sends a tombstone: a record with +key+ and no value (compacted topics delete the key's
    # earlier records). Consumers see +message.tombstone?+ true and a nil payload. Waits as
    # {#send_message} does.
    #
    # @param topic [String] destination topic
    # @param key [String] the key to delete
    # @param headers [Hash{String => String}] extra record headers
    # @param partition [Integer, nil] the partition to write; nil for the key's partition
    # @return [void]
    # @raise [ArgumentError] on a bad topic, key, headers or partition
    # @raise [Prosody::SendError] as for {#send_message}
    def send_tombstone(topic, key, headers: {}, partition: nil)
      Native::Pending.await do |waiter|
        native.send_record(waiter, topic, key, Outgoing::TOMBSTONE, headers, partition, true, Tracing.current)
      end
      nil
    end

    # Sends many records at once and waits once. Records of one partition are written in the
    # order given. Every record is checked before any is sent. A record that fails does not stop
    # the others: they are still delivered, and the failures are raised together. Waits as
    # {#send_message} does.
    #
    # @param records [Array<Hash>] each +{topic:, key:, payload:}+, with optional +headers:+
    #   and +partition:+; +{topic:, key:, tombstone: true}+ (and no payload) for a tombstone
    # @return [nil] once every record was acknowledged
    # @raise [ArgumentError] on a bad record, naming its index; nothing was sent
    # @raise [Prosody::SendError] listing each record that was not delivered (index, topic, key,
    #   reason; also as {SendError#failures}); the others were delivered
    def send_messages(records)
      raise ArgumentError, "records must be an Array of Hashes, got #{records.class}" unless records.is_a?(Array)

      failures = Native::Pending.await { |waiter| native.send_records(waiter, records, Tracing.current) }
      raise SendError.for_batch(failures, records.size) if failures

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

    # Events this client finished without calling the handler, since it was created, by reason:
    # records its own group produced (+:source_system+), messages whose event type
    # +allowed_events+ does not allow (+:filtered+), and messages whose +id+ was handled before
    # (+:duplicate+).
    #
    # @return [Hash{Symbol => Integer}]
    def skipped_events
      native.skipped_events
    end

    # What the telemetry emitter did since the client was created: events queued for
    # +telemetry_topic+ (+:emitted+), and events dropped (+:dropped+) because the emitter's or
    # the producer's queue was full, or because the broker did not take them within
    # +send_timeout+ (those were queued, so they count in both). Nil when the emitter does not run
    # (+telemetry_enabled+ false, or mock mode without +telemetry_enabled: true+).
    #
    # @return [Hash{Symbol => Integer}, nil]
    def telemetry_stats
      native.telemetry_stats
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
  end
end

at_exit { Prosody::Client.unsubscribe_all }

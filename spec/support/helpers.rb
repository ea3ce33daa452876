# frozen_string_literal: true

# Helpers shared by the specs: unique names, waiting on a condition with a deadline, a handler
# that records what it saw.
module SpecHelpers
  def unique(prefix)
    "#{prefix}-#{SecureRandom.hex(6)}"
  end

  # Waits until the block is truthy, failing after +timeout+ seconds (no fixed sleeps).
  def wait_for(timeout: 20, message: "condition")
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      value = yield
      return value if value
      if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
        raise "timed out after #{timeout}s waiting for #{message}"
      end

      sleep 0.01
    end
  end

  def log_output
    Prosody.flush_logs
    @log_io.string
  end

  def mock_client(topic, group: unique("group"), **options)
    # A generous send_timeout: these specs prove behaviour, and a busy CI machine must not turn a
    # slow first send (librdkafka's producer-id handshake) into a failure.
    Prosody::Client.new(mock: true, group_id: group, source_system: "spec-producer",
                        subscribed_topics: topic, commit_interval: 0.05, send_timeout: 10, **options)
  end

  # A client of the example's +topic+ (the mock cluster; the integration tier's helpers return
  # one on the real broker).
  def client_for(topic, **options)
    mock_client(topic, **options)
  end

  # Subscribes a client of the example's +topic+ with +handler+ (tracked, see below).
  def start(handler, **options)
    subscribe_tracked(client_for(topic, **options), handler)
  end

  # Subscribes +client+ with +handler+ and remembers it, so the example's clients are
  # unsubscribed after it (see spec_helper).
  def subscribe_tracked(client, handler)
    (@clients ||= []) << client
    client.subscribe(handler)
    client
  end

  def raw_producer
    Prosody::Native::RawProducer.new(Prosody::Native.mock_bootstrap_servers)
  end

  def prosody_threads
    Thread.list.select { |t| t.name&.start_with?("prosody-processor") }
  end

  # Records every call; optional block runs inside the handler.
  class RecordingHandler < Prosody::EventHandler
    attr_reader :calls

    def initialize(&block)
      super()
      @calls = []
      @lock = Mutex.new
      @block = block
    end

    def on_message(context, message)
      @block&.call(context, message)
      @lock.synchronize { @calls << message }
    end

    def count
      @lock.synchronize { @calls.size }
    end

    def payloads
      @lock.synchronize { @calls.map(&:payload) }
    end
  end
end

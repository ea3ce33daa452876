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

  # Engine DEBUG lines reach log_output for the rest of the example.
  def debug_logging!
    Prosody.logger = Logger.new(@log_io, level: Logger::DEBUG)
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
  #
  # No Mutex here or in any handler of the specs: Ruby 3.1.2's Mutex, contended between handler
  # fibers of several processor threads and the test's thread, once aborted the whole suite with
  # "[BUG] invalid keeping_mutexes: Attempt to unlock a mutex which is not locked" as a client
  # unsubscribed (a VM race fixed in later Rubies: ruby/ruby#7460, bug #19480). Appending to an
  # Array is atomic under the VM lock, and readers take a copy.
  class RecordingHandler < Prosody::EventHandler
    def initialize(&block)
      super()
      @calls = []
      @block = block
    end

    def on_message(context, message)
      @block&.call(context, message)
      @calls << message
    end

    def calls
      @calls.dup
    end

    def count
      @calls.size
    end

    def payloads
      calls.map(&:payload)
    end
  end

  # Records, from handlers on any thread and without a Mutex (see RecordingHandler), when each
  # key's handler starts and finishes; the test's thread reads the order and any overlap.
  class KeyLog
    def initialize
      @events = Queue.new
      @running = Hash.new(0)
      @overlaps = []
      @order = Hash.new { |h, k| h[k] = [] }
    end

    def start(key)
      @events << [:start, key]
    end

    def finish(key, seq)
      @events << [:finish, key, seq]
    end

    # @return [Array<String>] keys whose handler started while another of theirs ran
    def overlaps
      drain
      @overlaps
    end

    # @return [Hash{String => Array}] each key's sequence numbers in the order handled
    def order
      drain
      @order
    end

    # @return [Integer] distinct (key, seq) handled
    def seen
      order.values.sum { |seqs| seqs.uniq.size }
    end

    private

    # The queue's order is the order of the handlers' pushes (each is atomic under the VM lock).
    def drain
      loop do
        kind, key, seq = @events.pop(true)
        if kind == :start
          @overlaps << key if (@running[key] += 1) > 1
        else
          @order[key] << seq
          @running[key] -= 1
        end
      end
    rescue ThreadError
      nil # empty
    end
  end
end

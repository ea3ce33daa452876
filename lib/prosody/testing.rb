# frozen_string_literal: true

require "json"
require "prosody"

module Prosody
  # Helpers for the specs of an application built on Prosody, in mock mode, for RSpec and
  # Minitest alike (plain methods; include {Testing} in an example group or a test case, or call
  # them as +Prosody::Testing.records(...)+):
  #
  # - {#records} and {#wait_for_records}: what was produced to a mock topic;
  # - {#wait_until_handled}: until a subscribed client handled everything sent so far;
  # - {#advance_timers}: moves a client's timer clock, so that a timer hours ahead fires now;
  # - {#build_message}, {RecordingContext} and {RecordingProducer}: unit tests of a handler;
  # - {#reset_mock!}: a new, empty mock cluster for the clients created after it.
  #
  # Waiting methods raise {TimeoutError} naming what they waited for; none sleeps a fixed time.
  module Testing
    # A wait that did not end in time.
    class TimeoutError < Prosody::Error; end

    # The parts {#build_message} takes, with their defaults (+timestamp+ nil: now).
    MESSAGE_DEFAULTS = { topic: "test-topic", key: "test-key", payload: {}, headers: {}, partition: 0, offset: 0,
                         timestamp: nil, tombstone: false }.freeze

    module_function

    # Every record produced to mock +topic+ so far (all its partitions, each in offset order; an
    # empty Array when the topic does not exist yet).
    #
    # @param topic [String]
    # @return [Array<Record>]
    def records(topic)
      Native.mock_read_all(topic).map { |row| Record.new(topic, row) }
    end

    # Waits until mock +topic+ holds at least +count+ records, and returns them all.
    #
    # @param topic [String]
    # @param count [Integer]
    # @param timeout [Numeric] seconds
    # @return [Array<Record>]
    # @raise [TimeoutError] naming the topic and how many records it had
    def wait_for_records(topic, count, timeout: 5)
      found = []
      Testing.wait_until(timeout, -> { "#{count} records on #{topic.inspect} (found #{found.size})" }) do
        found = records(topic)
        found.size >= count
      end
      found
    end

    # Waits until +client+ (subscribed, owning every partition of its topics, as a client in a
    # spec does) handled every record written to its topics before this call: each partition is
    # assigned to it and finished below its high watermark (handled, skipped, dead-lettered or
    # deferred), and no message or timer is in flight.
    #
    # @param client [Prosody::Client]
    # @param timeout [Numeric] seconds
    # @return [void]
    # @raise [TimeoutError]
    def wait_until_handled(client, timeout: 10)
      native = client.__send__(:native)
      topics = native.subscribed_topics
      high = topics.flat_map do |topic|
        Native.mock_high_watermarks(topic).map { |partition, offset| [topic, partition, offset] }
      end
      Testing.wait_until(timeout, -> { "the client to handle everything on #{topics.inspect}" }) do
        native.settled?(high)
      end
    end

    # Moves +client+'s timer clock +seconds+ forward (it never moves back) and waits until the
    # timers that became due fired and their handlers finished. Only timers are affected:
    # message timestamps, retry delays and timeouts keep the real clock. What did not become due
    # provably did not fire once this returns.
    #
    # @param client [Prosody::Client] subscribed
    # @param seconds [Numeric] rounded up to whole seconds
    # @param timeout [Numeric] seconds
    # @return [void]
    # @raise [TimeoutError]
    def advance_timers(client, seconds, timeout: 10)
      raise ArgumentError, "advance_timers moves the clock forward, got #{seconds.inspect}" unless seconds.to_r >= 0

      native = client.__send__(:native)
      move = native.advance_timers(seconds.to_r.ceil)
      Testing.wait_until(timeout, -> { "the timers due after moving the clock #{seconds}s to finish" }) do
        native.timers_caught_up?(move)
      end
    end

    # Gives the clients created from now on a new, empty mock cluster (no topics, no records, no
    # consumer groups), for examples that reuse topic names. Clients created before keep the
    # cluster they were created with until they are garbage-collected; unsubscribe them first.
    #
    # @return [void]
    def reset_mock!
      Native.mock_reset
    end

    # A {Prosody::Message} built from parts, decoded exactly as a consumed record is (the payload
    # goes through JSON, so its types are those a handler sees).
    #
    # @param parts [Hash] any of {MESSAGE_DEFAULTS}: +topic+, +key+ (a String, or nil for a
    #   keyless record), +payload+ (anything JSON encodes), +headers+ (String => String),
    #   +partition+, +offset+, +timestamp+ (a Time; now by default), +tombstone+ (true: no value)
    # @return [Prosody::Message]
    # @raise [ArgumentError] naming a part it does not know
    def build_message(**parts)
      unknown = parts.keys - MESSAGE_DEFAULTS.keys
      if unknown.any?
        raise ArgumentError,
              "build_message takes #{MESSAGE_DEFAULTS.keys.inspect}, got #{unknown.inspect}"
      end

      p = MESSAGE_DEFAULTS.merge(parts)
      raw = p[:tombstone] ? nil : JSON.generate(p[:payload], quirks_mode: true)
      millis = ((p[:timestamp] || Time.now).to_r * 1000).floor
      Native.build_message(p[:topic], p[:partition], p[:offset], p[:key]&.b, raw, p[:headers], millis)
    end

    # Calls the block until it is truthy, at most +timeout+ seconds.
    #
    # @api private
    def wait_until(timeout, what)
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
      until yield
        raise TimeoutError, "timed out after #{timeout}s waiting for #{what.call}" if
          Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

        sleep 0.005
      end
    end
  end
end

require_relative "testing/record"
require_relative "testing/recording_context"
require_relative "testing/recording_producer"

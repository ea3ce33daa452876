# frozen_string_literal: true

module Prosody
  # Base class of every error Prosody raises (configuration errors are ArgumentError).
  class Error < StandardError; end

  # Raised when a record could not be delivered: broker unreachable, `send_timeout` elapsed,
  # or the broker refused it.
  class SendError < Error
    # @return [Array<Hash>] for Client#send_messages, each record that was not delivered:
    #   +{index:, topic:, key:, reason:}+ (empty for a single send)
    attr_reader :failures

    # @param message [String]
    # @param failures [Array<Hash>]
    def initialize(message = nil, failures: [])
      super(message)
      @failures = failures.freeze
    end

    # @api private
    # The error for a batch of +size+ records: +failures+ are +[index, topic, key, reason]+.
    def self.for_batch(failures, size)
      listed = failures.map { |index, topic, key, reason| { index:, topic:, key:, reason: } }
      lines = listed.map do |f|
        "  record #{f[:index]} (topic #{f[:topic].inspect}, key #{f[:key].inspect}): #{f[:reason]}"
      end
      new("#{listed.size} of #{size} records were not delivered (the others were):\n#{lines.join("\n")}",
          failures: listed)
    end
  end

  # Raised when subscribing fails: no `group_id` or `subscribed_topics`, already subscribed,
  # or the consumer could not be created.
  class SubscriptionError < Error; end

  # Raised when a timer operation cannot be done: the event has no key, the client has no timer
  # store, or the store failed.
  class TimerError < Error; end

  # Raised when the client itself cannot be created or used (librdkafka rejected the settings,
  # the engine could not start, or the client was created before this process forked).
  class ClientError < Error; end

  # Raise it from a handler to mark the failure permanent: retrying cannot help. In every mode
  # the event is not retried; it goes to the failure topic when one is set, and is committed.
  class PermanentError < Error; end

  # Raise it from a handler to mark the failure transient: a retry may succeed. This is also
  # what every unclassified exception counts as.
  class TransientError < Error; end

  # The error class named (in logs and in the dead-letter headers) when a message was rejected
  # without running because its key used more than +monopolization_threshold+ of the last
  # +monopolization_window+ of handler time (pipeline mode). It is transient: the message is
  # deferred like any transient failure. Prosody never raises it into application code.
  class MonopolizationError < TransientError; end
end

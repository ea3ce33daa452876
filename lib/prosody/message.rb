# frozen_string_literal: true

module Prosody
  # A consumed Kafka record (defined natively): +topic+, +partition+, +offset+, +timestamp+
  # (Time), +key+ (String, or nil for a record produced without a key), +payload+ (decoded JSON;
  # Hash keys are Strings) and +headers+ (Hash of String => String).
  class Message
    # @return [Hash] the message's fields
    def to_h
      { topic:, partition:, offset:, timestamp:, key:,
        payload:, headers: }
    end
  end

  # What a handler can ask about the event it handles (defined natively).
  class Context
    # Waits until cancellation is requested (timeout, revoke or shutdown). Inside a handler it
    # yields to other handlers while it waits.
    #
    # @return [void]
    def on_cancel
      sleep(0.01) until should_cancel?
    end
  end
end

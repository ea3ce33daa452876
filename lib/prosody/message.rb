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
end

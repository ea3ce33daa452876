# frozen_string_literal: true

module Prosody
  module Testing
    # A record read back from a mock topic by {Testing.records}.
    class Record
      # @return [String]
      attr_reader :topic
      # @return [Integer]
      attr_reader :partition
      # @return [Integer]
      attr_reader :offset
      # @return [String, nil] as sent (binary); nil for a keyless record
      attr_reader :key
      # @return [String, nil] the payload's bytes; nil for a tombstone
      attr_reader :raw_payload
      # @return [Hash{String => String}] values as sent (binary)
      attr_reader :headers

      # @param topic [String]
      # @param row [Hash] as +Prosody::Native.mock_read_all+ gives it
      def initialize(topic, row)
        @topic = topic
        @partition = row["partition"]
        @offset = row["offset"]
        @key = row["key"]
        @raw_payload = row["payload"]
        @headers = row["headers"].to_h
      end

      # @return [Object, nil] the JSON payload decoded (Integers stay Integers); nil for a
      #   tombstone
      def payload
        @raw_payload && JSON.parse(@raw_payload, quirks_mode: true)
      end

      # @return [String]
      def inspect
        "#<Prosody::Testing::Record #{topic}/#{partition}@#{offset} key=#{key.inspect} payload=#{raw_payload}>"
      end
    end
  end
end

# frozen_string_literal: true

module Prosody
  module Testing
    # A stand-in for the {Prosody::Client} a handler sends with, in unit tests: it records each
    # send instead of producing, after the same checks of topic, key and payload (a payload JSON
    # cannot encode raises here as it would there).
    class RecordingProducer
      # One recorded send.
      class Sent
        # @return [String]
        attr_reader :topic
        # @return [String]
        attr_reader :key
        # @return [Object] as given to send_message
        attr_reader :payload
        # @return [Hash{String => String}]
        attr_reader :headers
        # @return [Integer, nil]
        attr_reader :partition

        def initialize(topic:, key:, payload:, headers:, partition:)
          @topic = topic
          @key = key
          @payload = payload
          @headers = headers
          @partition = partition
        end
      end

      # @return [Array<Sent>] every send, in order
      attr_reader :sent

      def initialize
        @sent = []
      end

      # @see Prosody::Client#send_message
      def send_message(topic, key, payload, headers: {}, partition: nil)
        unless topic.is_a?(String) && !topic.empty?
          raise ArgumentError, "topic must be a non-empty String, got #{topic.inspect}"
        end
        raise ArgumentError, "key must be a String, got #{key.inspect}" unless key.is_a?(String)

        JSON.generate(payload, quirks_mode: true)
        @sent << Sent.new(topic:, key:, payload:, headers:, partition:)
        nil
      end

      # @return [Array<Sent>] the sends to +topic+
      def sent_to(topic)
        @sent.select { |s| s.topic == topic }
      end
    end
  end
end

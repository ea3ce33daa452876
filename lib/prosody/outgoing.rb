# frozen_string_literal: true

module Prosody
  # @api private
  #
  # Checks and encodes what the application sends, before anything is sent: a bad record is an
  # ArgumentError that says what is wrong and where.
  module Outgoing
    # Stands for "no value" where a payload goes (nil is JSON null).
    TOMBSTONE = Object.new.freeze

    # Keys a record Hash of Client#send_messages may have.
    RECORD_KEYS = %i[topic key payload headers partition tombstone].freeze

    JSON_LEAVES = [String, Symbol, Integer, TrueClass, FalseClass, NilClass].freeze
    private_constant :JSON_LEAVES

    class << self
      # A record as the native client takes it: +[topic, key, json_or_nil, headers, partition]+
      # (+payload+ TOMBSTONE for a record with no value). The native client reads plain parts
      # itself and asks here for the others.
      #
      # @raise [ArgumentError] naming the bad value
      def row(topic, key, payload, headers, partition)
        raise ArgumentError, "headers must be a Hash, got #{headers.class}" unless headers.is_a?(Hash)
        unless partition.nil? || (partition.is_a?(Integer) && partition.between?(0, (2**31) - 1))
          raise ArgumentError, "partition must be nil or an Integer from 0 to #{(2**31) - 1}, got #{partition.inspect}"
        end

        [string_arg("topic", topic), string_arg("key", key, allow_empty: true),
         payload.equal?(TOMBSTONE) ? nil : encode(payload), headers, partition]
      end

      # The row of +record+, the +index+th of a Client#send_messages batch (the native client
      # reads plain records itself and asks for the others here).
      #
      # @raise [ArgumentError] naming the index and what is wrong
      def indexed_row(record, index)
        record_row(record)
      rescue ArgumentError => e
        raise ArgumentError, "record #{index}: #{e.message}"
      end

      private

      def record_row(record)
        raise ArgumentError, "expected a Hash, got #{record.inspect}" unless record.is_a?(Hash)

        unknown = record.keys - RECORD_KEYS
        raise ArgumentError, "unknown key(s) #{unknown.map(&:inspect).join(', ')}; valid: #{RECORD_KEYS.join(', ')}" \
          if unknown.any?

        row(record[:topic], record[:key], record_payload(record), record.fetch(:headers, {}), record[:partition])
      end

      def record_payload(record)
        unless [nil, true, false].include?(record[:tombstone])
          raise ArgumentError, "tombstone must be true or false, got #{record[:tombstone].inspect}"
        end

        if record[:tombstone]
          raise ArgumentError, "a tombstone has no payload; leave :payload out" if record.key?(:payload)

          return TOMBSTONE
        end
        raise ArgumentError, "missing :payload (use tombstone: true for a record with no value)" \
          unless record.key?(:payload)

        record[:payload]
      end

      def string_arg(name, value, allow_empty: false)
        value = value.to_s if value.is_a?(Symbol)
        unless value.is_a?(String) && (allow_empty || !value.empty?)
          raise ArgumentError, "#{name} must be a #{allow_empty ? '' : 'non-empty '}String, got #{value.inspect}"
        end

        value
      end

      def encode(payload)
        raise ArgumentError, json_error(payload, "payload") unless json_value?(payload)

        JSON.generate(payload)
      rescue JSON::GeneratorError, JSON::NestingError, EncodingError => e
        raise ArgumentError, "payload cannot be encoded as JSON: #{e.message}"
      end

      # Only values that JSON represents as themselves are sent: anything else would go out as
      # its +to_s+ ("#<Object:0x...>"). Symbols are sent as Strings. The check allocates nothing;
      # the place of a bad value is worked out only for the error.
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
end

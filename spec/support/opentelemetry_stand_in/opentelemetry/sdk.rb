# frozen_string_literal: true

require "opentelemetry"

# Stand-in for opentelemetry-sdk (see ../opentelemetry.rb): SDK.configure with the settings the
# README's sample makes, and the batch span processor it names.
module OpenTelemetry
  # The SDK's configuration entry point.
  module SDK
    # What SDK.configure yields.
    class Configurator
      attr_accessor :service_name
      attr_reader :span_processors

      def initialize
        @span_processors = []
      end

      def add_span_processor(processor)
        @span_processors << processor
      end
    end

    def self.configure
      yield(@configuration = Configurator.new)
    end

    class << self
      attr_reader :configuration
    end

    module Trace
      module Export
        # Holds the exporter it was given.
        class BatchSpanProcessor
          attr_reader :exporter

          def initialize(exporter)
            @exporter = exporter
          end
        end
      end
    end
  end
end

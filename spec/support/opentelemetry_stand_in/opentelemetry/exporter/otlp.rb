# frozen_string_literal: true

# Stand-in for opentelemetry-exporter-otlp (see ../../opentelemetry.rb).
module OpenTelemetry
  module Exporter
    module OTLP
      # Exports nothing: the specs read OpenTelemetry::SPANS.
      class Exporter
        attr_reader :options

        def initialize(**options)
          @options = options
        end
      end
    end
  end
end

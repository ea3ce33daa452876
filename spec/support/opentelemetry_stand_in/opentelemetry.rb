# frozen_string_literal: true

# A stand-in for the opentelemetry-api gem, which cannot be installed here (no RubyGems). It
# implements just the calls Prosody makes (OpenTelemetry.propagation.extract / inject,
# OpenTelemetry::Context.with_current / current) and those of the README's samples (a tracer whose
# in_span starts a child of the current span, Span#add_event). Finished spans are kept in
# OpenTelemetry::SPANS for the specs to read. Not the real gem: only what the specs use.
module OpenTelemetry
  # Every span started, in order.
  SPANS = Queue.new

  # A span: ids as lowercase hex, the parent's id (nil for a root), its events.
  Span = Struct.new(:trace_id, :span_id, :parent_id, :name, :events) do
    def add_event(name, attributes: {})
      events << [name, attributes]
    end
  end

  # The current span of a fiber.
  class Context
    attr_reader :span

    def initialize(span)
      @span = span
    end

    def self.current
      Thread.current[:opentelemetry_stand_in] || new(nil)
    end

    def self.with_current(context)
      outer = Thread.current[:opentelemetry_stand_in]
      Thread.current[:opentelemetry_stand_in] = context
      yield
    ensure
      Thread.current[:opentelemetry_stand_in] = outer
    end
  end

  # W3C traceparent only.
  module Propagation
    def self.extract(carrier)
      _, trace_id, span_id, = carrier.fetch("traceparent").split("-")
      Context.new(Span.new(trace_id, span_id, nil, :remote, []))
    end

    def self.inject(carrier)
      span = Context.current.span
      carrier["traceparent"] = "00-#{span.trace_id}-#{span.span_id}-01" if span
    end
  end

  # Starts spans as children of the current one.
  class Tracer
    def in_span(name)
      parent = Context.current.span
      span = Span.new(parent&.trace_id || format("%032x", rand(2**128)), format("%016x", rand(2**64)),
                      parent&.span_id, name, [])
      SPANS << span
      Context.with_current(Context.new(span)) { yield span }
    end
  end

  # Hands out tracers.
  class TracerProvider
    def tracer(_name = nil, _version = nil)
      Tracer.new
    end
  end

  def self.propagation
    Propagation
  end

  def self.tracer_provider
    TracerProvider.new
  end
end

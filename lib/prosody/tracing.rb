# frozen_string_literal: true

module Prosody
  # @api private
  #
  # Carries trace context between the engine's spans and Ruby code. A handler call runs with its
  # {Context} as the fiber's current one (the processor sets {CURRENT}), so what the handler
  # sends carries the trace of the span that wraps the call (see {Context#trace_context}). When
  # the +opentelemetry-api+ gem is loaded before subscribe, the handler also runs inside an
  # +OpenTelemetry::Context+ whose remote parent is that span: a span the handler starts is its
  # child, and what it sends inside such a span carries the child's context instead.
  module Tracing
    # Fiber-local slot of the running handler call's context.
    CURRENT = :prosody_context

    # Runs the handler call of +context+ inside an OpenTelemetry context whose remote parent is
    # the engine's span (the processor calls it when the gem was loaded before subscribe).
    #
    # @param context [Prosody::Context]
    def self.within(context, &)
      carrier = context.trace_context
      return yield if carrier.empty?

      ::OpenTelemetry::Context.with_current(::OpenTelemetry.propagation.extract(carrier), &)
    end

    # What a record sent now should carry as its trace context: the application's current
    # OpenTelemetry span (as a W3C carrier Hash) when the gem is loaded and a span is current,
    # else the running handler call's context, else nil.
    #
    # @return [Hash{String => String}, Prosody::Context, nil]
    def self.current
      if opentelemetry?
        carrier = {}
        ::OpenTelemetry.propagation.inject(carrier)
        return carrier unless carrier.empty?
      end
      Thread.current[CURRENT]
    end

    # Whether the +opentelemetry-api+ gem is loaded.
    def self.opentelemetry?
      !defined?(::OpenTelemetry::Context).nil? && ::OpenTelemetry.respond_to?(:propagation)
    end
  end
end

# Spans still batched leave before the process ends. at_exit hooks run in reverse order of
# registration: this one (registered when Prosody is required, before Client's hook that
# unsubscribes the clients still subscribed, and after Logging's) runs after that unsubscribe and
# before the last engine lines are handed to Prosody.logger.
at_exit { Prosody::Native.flush_spans }

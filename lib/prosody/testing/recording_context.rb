# frozen_string_literal: true

module Prosody
  module Testing
    # A stand-in for {Prosody::Context} in unit tests of a handler: it keeps the key's timers in
    # memory with the real context's rules (times rounded up to whole seconds, one timer per
    # second, the same range checks and errors) and records every call, so a test can call
    # +handler.on_message(context, message)+ directly and look at what the handler asked for.
    #
    # @example
    #   context = Prosody::Testing::RecordingContext.new
    #   handler.on_message(context, Prosody::Testing.build_message(payload: { "remind_in" => 3600 }))
    #   expect(context.scheduled).to eq([Time.at(now + 3600)])
    #   expect(context.calls.map(&:first)).to eq([:clear_and_schedule])
    class RecordingContext
      # @return [Array<Array>] every call in order, as [name, *arguments] (times as given)
      attr_reader :calls

      # @param scheduled [Array<Time>] the key's timers before the call
      def initialize(scheduled: [])
        @calls = []
        @timers = scheduled.map { |t| Context.timer_seconds(t) }.uniq.sort
        @cancelled = false
      end

      # @see Prosody::Context#schedule
      def schedule(time)
        seconds = record(:schedule, time)
        @timers = (@timers | [seconds]).sort
        nil
      end

      # @see Prosody::Context#clear_and_schedule
      def clear_and_schedule(time)
        @timers = [record(:clear_and_schedule, time)]
        nil
      end

      # @see Prosody::Context#unschedule
      def unschedule(time)
        seconds = record(:unschedule, time)
        @timers.delete(seconds)
        nil
      end

      # @see Prosody::Context#clear_scheduled
      def clear_scheduled
        @calls << [:clear_scheduled]
        @timers = []
        nil
      end

      # @return [Array<Time>] the key's timers, earliest first
      def scheduled
        @calls << [:scheduled]
        @timers.map { |s| Time.at(s) }
      end

      # @return [Boolean] true once {#cancel!} was called
      def should_cancel?
        @cancelled
      end

      # Returns at once when {#cancel!} was called; otherwise raises, since nothing in a unit test
      # would ever cancel the call.
      def on_cancel
        return if @cancelled

        raise Prosody::Error, "RecordingContext#on_cancel would wait forever: call cancel! first"
      end

      # Makes {#should_cancel?} true, as a timeout or shutdown would.
      def cancel!
        @cancelled = true
      end

      # @return [Hash{String => String}] an empty trace carrier (no span in a unit test)
      def trace_context
        {}
      end

      private

      def record(name, time)
        seconds = Context.timer_seconds(time)
        @calls << [name, time]
        seconds
      end
    end
  end
end

# frozen_string_literal: true

module Prosody
  # What a handler can ask about, and do for, the event it handles. Timer methods act on the
  # event's key; they work only while the handler call that received the context is running.
  class Context
    # Earliest time a timer can have.
    TIMER_MIN = Time.at(0).utc.freeze
    # Latest time a timer can have.
    TIMER_MAX = Time.utc(9999, 12, 31, 23, 59, 59).freeze

    # Converts +time+ to whole seconds since the epoch, rounding up: a timer never fires before
    # the time it was given.
    #
    # @api private
    # @raise [ArgumentError] when +time+ is not a Time (nor responds to +to_time+) or is outside
    #   {TIMER_MIN}..{TIMER_MAX}
    def self.timer_seconds(time)
      time = time.to_time if !time.is_a?(Time) && time.respond_to?(:to_time)
      unless time.is_a?(Time)
        raise ArgumentError,
              "timer time must be a Time (or respond to to_time), got #{time.inspect}"
      end

      seconds = time.to_r.ceil
      unless seconds.between?(TIMER_MIN.to_i, TIMER_MAX.to_i)
        raise ArgumentError, "timer time #{time} is outside the supported range #{TIMER_MIN}..#{TIMER_MAX}"
      end

      seconds
    end

    # Schedules a timer for this event's key. Scheduling the same second twice keeps one timer;
    # a time in the past fires as soon as possible. Returns once the timer is stored.
    #
    # @param time [Time, #to_time] stored with second precision (rounded up to the next whole
    #   second, so it never fires early; {#scheduled} reports the rounded time)
    # @return [void]
    def schedule(time)
      await(start_schedule(Context.timer_seconds(time)))
      nil
    end

    # Removes every timer of this event's key, then schedules one at +time+.
    #
    # @param time [Time, #to_time]
    # @return [void]
    def clear_and_schedule(time)
      await(start_clear_and_schedule(Context.timer_seconds(time)))
      nil
    end

    # Removes the key's timer at +time+ (rounded up to the second, as {#schedule} does), if there
    # is one.
    #
    # @param time [Time, #to_time]
    # @return [void]
    def unschedule(time)
      await(start_unschedule(Context.timer_seconds(time)))
      nil
    end

    # Removes every timer of this event's key.
    #
    # @return [void]
    def clear_scheduled
      await(start_clear_scheduled)
      nil
    end

    # @return [Array<Time>] the key's scheduled timers, earliest first
    def scheduled
      await(start_scheduled).map { |seconds| Time.at(seconds) }
    end

    private

    # Timer operations run on the engine; the handler's fiber waits for the result while the
    # other handlers keep running.
    def await(operation)
      processor = Thread.current.thread_variable_get(:prosody_processor)
      unless processor
        raise Prosody::Error, "timer methods work only inside the handler call that received this context"
      end

      processor.await_operation(operation)
    end

    public

    # Waits until cancellation is requested (timeout, revoke or shutdown), yielding to other
    # handlers meanwhile, and returns. The handler then receives Async::Stop at its next yield
    # point (so clean up in +ensure+, or return promptly).
    #
    # @return [void]
    # @raise [Prosody::Error] when the handler call that received this context already returned
    def on_cancel
      check_active
      return if should_cancel?

      processor = Thread.current.thread_variable_get(:prosody_processor)
      return processor.await_cancel(job_id) if processor

      sleep(0.01) until should_cancel?
    end
  end

  # A timer that came due, passed to {EventHandler#on_timer}.
  class Timer
    # @return [String] the key the timer belongs to
    attr_reader :key
    # @return [Time] the time it was scheduled for
    attr_reader :time

    # @param key [String]
    # @param time [Time]
    def initialize(key, time)
      @key = key
      @time = time
    end

    # @return [String]
    def inspect
      "#<Prosody::Timer key=#{key.inspect} time=#{time}>"
    end
  end
end

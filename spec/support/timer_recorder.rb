# frozen_string_literal: true

# Records messages and timers in order, flags any overlap of one key's events.
class TimerRecorder < Prosody::EventHandler
  attr_reader :events, :overlaps

  def initialize(&on_message)
    super()
    @on_message = on_message
    @events = []
    @running = Hash.new(0)
    @overlaps = 0
    @timer_hook = nil
  end

  def on_timer_do(&block)
    @timer_hook = block
  end

  def on_message(context, message)
    around(message.key) do
      @on_message&.call(context, message)
      @events << [:message, message.key, message.payload]
    end
  end

  def on_timer(context, timer)
    around(timer.key) do
      @timer_hook&.call(context, timer)
      @events << [:timer, timer.key, timer.time, Time.now]
    end
  end

  def timers
    @events.select { |e| e.first == :timer }
  end

  private

  def around(key)
    @overlaps += 1 if (@running[key] += 1) > 1
    Async::Task.current.yield
    yield
  ensure
    @running[key] -= 1
  end
end

# frozen_string_literal: true

# Records each fired timer with the moment it fired.
class FiredTimers < Prosody::EventHandler
  def initialize
    super()
    @fired = [] # no Mutex in handlers (see SpecHelpers::RecordingHandler)
  end

  def on_message(_context, _message); end

  def on_timer(_context, timer)
    @fired << [timer.key, timer.time.to_i, Time.now.to_f]
  end

  def fired
    @fired.dup
  end
end

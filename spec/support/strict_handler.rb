# frozen_string_literal: true

require_relative "switch_handler"

# A SwitchHandler that fails permanently (a TypeError, declared permanent) on payloads with "bad".
class StrictHandler < SwitchHandler
  permanent :on_message, TypeError

  def on_message(context, message)
    super
    raise TypeError, "malformed" if message.payload["bad"]
  end
end

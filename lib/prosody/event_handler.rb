# frozen_string_literal: true

module Prosody
  # Base class for handlers. Subclass it and implement {#on_message}. Calls for different keys
  # run concurrently (as Async tasks on one thread), calls for one key one at a time, in order.
  class EventHandler
    # Handles one message. An exception marks the message failed; it is logged with its topic,
    # partition, offset and key, and never stops the client.
    #
    # @param context [Prosody::Context]
    # @param message [Prosody::Message]
    # @return [void]
    def on_message(context, message)
      raise NotImplementedError, "#{self.class} must implement on_message(context, message)"
    end
  end
end

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

    # Handles a timer of a key, scheduled earlier with {Context#schedule}. It runs in the key's
    # order with its messages, never at the same time as one. An exception marks the timer
    # failed; it stays stored and is retried with backoff.
    #
    # @param context [Prosody::Context]
    # @param timer [Prosody::Timer]
    # @return [void]
    def on_timer(context, timer)
      raise NotImplementedError, "#{self.class} scheduled a timer but does not implement on_timer(context, timer)"
    end

    # @api private
    # @return [Boolean] whether this handler defines its own on_timer
    def uses_timers?
      method(:on_timer).owner != Prosody::EventHandler
    end
  end
end

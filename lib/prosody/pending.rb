# frozen_string_literal: true

require "io/wait"

module Prosody
  module Native
    # @api private
    #
    # The result of one engine operation (a send) for a fiber of any Async reactor. The class
    # method chooses how the caller waits, so that a wait never freezes a reactor.
    class Pending
      # Starts an operation with the block (which receives the waiter to pass to the native
      # call) and returns its value, or raises its error:
      # - a handler's fiber: the processor's bridge; only this fiber waits;
      # - a fiber of another reactor (the application's own +Async+ block): a Pending, whose
      #   descriptor this fiber waits on; only this fiber waits;
      # - a thread with no reactor (or a blocking fiber): nil; the native call blocks this
      #   thread with the GVL released.
      def self.await
        return yield(nil) if Fiber.scheduler.nil? || Fiber.current.blocking?

        processor = Thread.current.thread_variable_get(:prosody_processor)
        return processor.await_operation(yield(processor.bridge)) if processor

        pending = new
        yield(pending)
        pending.wait
      end

      # Waits (a fiber-scheduler wait) until the result is in; returns it or raises it.
      def wait
        io = IO.for_fd(fd, autoclose: false)
        io.wait_readable until ready?
        result
      end
    end
  end
end

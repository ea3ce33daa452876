# frozen_string_literal: true

module Prosody
  # @api private
  #
  # The few places where async 1.x and 2.x differ, kept together so that the processor reads the
  # same on both. Everything else the processor uses (tasks, Async::Notification, Task#yield,
  # Async::Stop) is public API that both majors share.
  module AsyncRuntime
    # The major version of the async gem that Ruby activated.
    MAJOR = Integer(Async::VERSION.split(".").first)

    # async 2's fiber scheduler asks every IO for its +timeout+ (IO#timeout, new in Ruby 3.2)
    # before waiting on it; on Ruby 3.1 that raised NoMethodError in every IO wait of a task, the
    # processor's own and every handler's. Ruby 3.2 answers nil unless a timeout was set, and so
    # does this stand-in, defined only where the method is missing.
    if MAJOR >= 2 && !IO.method_defined?(:timeout)
      IO.class_eval do
        # @return [nil] no IO timeout (what Ruby 3.2 answers by default)
        def timeout
          nil
        end
      end
    end

    class << self
      # Runs the block as the root task of a new reactor on the current thread (which becomes
      # the thread's fiber scheduler), until every task finished; then closes the reactor.
      #
      # @yieldparam task [Async::Task]
      def run(&)
        reactor = MAJOR >= 2 ? Async::Reactor.new : Async::Reactor.new(selector: nio_selector)
        reactor.run(&)
      ensure
        reactor&.close
      end

      # Stops +task+ at the reactor's next turn, not now: fibers resumed before it (a handler's
      # on_cancel waiter) run first, and the task receives Async::Stop at its next yield point.
      # Task#stop raises into another task at once on both majors, so Async::Stop::Later (which
      # both provide) is queued instead, in the way each major queues work for its next turn.
      #
      # @param task [Async::Task] a task other than the current one
      def stop_later(task)
        later = Async::Stop::Later.new(task)
        MAJOR >= 2 ? Fiber.scheduler.push(later) : task.reactor << later
      end

      private

      # async 1.x: libev's select backend unless ASYNC_BACKEND names another. epoll rounds every
      # wait up to a whole millisecond, so timers a few microseconds apart (handlers that started
      # one after another) cost an extra millisecond each round; select waits with microsecond
      # precision. Measured with 32 tasks each sleeping 1 ms: epoll 16k iterations/s, select
      # 28k/s. libev's select backend has no FD_SETSIZE limit. (async 2 chooses its io-event
      # selector itself; IO_EVENT_SELECTOR overrides it.)
      def nio_selector
        require "nio"
        backend = ENV.fetch("ASYNC_BACKEND", "select").to_sym
        NIO::Selector.new(NIO::Selector.backends.include?(backend) ? backend : nil)
      end
    end
  end
end

# frozen_string_literal: true

module Prosody
  # @api private
  #
  # Runs the handler calls of one subscription on its own Ruby thread inside an Async reactor.
  #
  # A fixed pool of long-lived worker tasks (one per +max_concurrency+ slot) pulls jobs from the
  # native bridge: a worker takes its next job the moment it is free, with no round trip through
  # the engine. Workers with nothing to do wait on a notification; the main task waits on the
  # bridge's pipe (a fiber-scheduler wait, so handler I/O keeps running) and wakes them when
  # work arrives, once per idle period. Reusing tasks is an order of magnitude cheaper than a
  # task per message; a cancelled job stops its worker, and a replacement takes its place.
  class Processor
    # @return [Thread, nil] the processor thread
    attr_reader :thread
    # @return [Exception, nil] what ended the processor thread, when it died (it never should)
    attr_reader :failure
    # @return [Prosody::Native::Bridge] where operations started for handler fibers report
    attr_reader :bridge

    # @param bridge [Prosody::Native::Bridge]
    # @param handler [Prosody::EventHandler]
    # @param concurrency [Integer] worker tasks, the most handler calls that run at once
    def initialize(bridge, handler, concurrency)
      @bridge = bridge
      @handler = handler
      @concurrency = concurrency
      @thread = nil
      @failure = nil
    end

    # Starts the processor thread.
    def start
      @thread = Thread.new { run }
      @thread.name = "prosody-processor"
      self
    end

    # Closes the bridge and waits for the thread. Call after the engine stopped.
    def stop
      @bridge.close
      @thread&.join
      nil
    end

    # Waits (yielding to other handlers) for the result of a context operation started on the
    # engine, and returns its value or raises its error. Call it right after the native start
    # call, without yielding in between: results are delivered by this thread's main fiber, so
    # none can arrive before the waiter is registered.
    #
    # @param id [Integer] the operation id returned by the native start call
    def await_operation(id)
      waiter = Async::Notification.new
      @operation_waiters[id] = waiter
      value, error_class, message = waiter.wait
      raise(error_class, message) if error_class

      value
    end

    # Waits (yielding to other handlers) until job +id+ is cancelled. Returns before the handler
    # receives Async::Stop, which comes at its next yield point.
    #
    # @param id [Integer] the job id of the context
    def await_cancel(id)
      waiter = Async::Notification.new
      @cancel_waiters[id] = waiter
      waiter.wait
    ensure
      @cancel_waiters.delete(id)
    end

    private

    def run
      Thread.current.thread_variable_set(:prosody_processor, self)
      @operation_waiters = {}
      @cancel_waiters = {}
      @retiring = {}
      @flush = Async::Notification.new
      # Whether handler calls run inside an OpenTelemetry context: the gem must be loaded before
      # subscribe (checked once, not per message).
      @opentelemetry = Tracing.opentelemetry?
      AsyncRuntime.run { |task| serve(task) }
    rescue Exception => e # rubocop:disable Lint/RescueException
      # Whatever ends the reactor (a handler never does: its errors are outcomes) is never silent:
      # it is logged, the client reads as stalled, and unsubscribe reports it.
      @failure = e
      Prosody.log(Logger::ERROR, "the processor thread died: #{e.class}: #{e.message}\n  " \
                                 "#{(e.backtrace || []).first(10).join("\n  ")}")
    ensure
      # Queued jobs are dropped (reported abandoned: not committed) and take returns false.
      @bridge.close
    end

    def serve(task)
      io = IO.for_fd(@bridge.fd, autoclose: false)
      work = Async::Notification.new
      running = {}
      flusher = task.async { loop { @bridge.flush if @flush.wait } }
      @concurrency.times { spawn_worker(task, work, running) }
      loop do
        io.wait_readable
        ids = @bridge.cancellations
        ids&.each { |id| cancel(id, running, task, work) }
        deliver_operations
        work.signal
        break unless ids
      end
    ensure
      flusher&.stop
    end

    # Hands finished operations to their waiting fibers. A result nobody waits for (an operation
    # started from another thread, which raised instead of waiting) is dropped.
    def deliver_operations
      @bridge.finished_ops.each do |id, *result|
        @operation_waiters.delete(id)&.signal(result)
      end
    end

    def spawn_worker(task, work, running)
      task.async do |worker|
        while (job = @bridge.take) != false
          if job
            id, context, event = job # (a splat in the call would copy the Array three times)
            run_job(id, context, event, worker, running)
            # A cancelled job's worker was replaced; if its handler swallowed Async::Stop and
            # returned, this worker ends here instead of pulling more jobs.
            break if @retiring.key?(worker)
          else
            work.wait
          end
        end
      ensure
        @retiring.delete(worker)
      end
    end

    # Cancels job +id+: its context's on_cancel returns first, then the worker running it
    # receives Async::Stop at its next yield point, and a replacement worker starts at once.
    # A job already finished is left alone.
    def cancel(id, running, task, work)
      worker = running[id]
      return unless worker

      @cancel_waiters[id]&.signal
      @retiring[worker] = true
      AsyncRuntime.stop_later(worker)
      spawn_worker(task, work, running)
    end

    # Runs job +id+: the handler gets +context+ and +event+ (a Message, or [key, seconds] for a
    # timer); the outcome is reported through the bridge with the context.
    def run_job(id, context, event, worker, running)
      running[id] = worker
      finished = false
      timer = event.is_a?(Array)
      event = Timer.new(event[0], Time.at(event[1])) if timer
      # What the handler sends carries the call's trace context (see Tracing.current).
      Thread.current[Tracing::CURRENT] = context
      begin
        call_handler(context, event, timer)
        completed(@bridge.succeed(context))
        finished = true
      rescue Async::Stop => e
        # Re-raised by the handler (or never caught): a transient failure; the task stops.
        completed(@bridge.fail(context, "Async::Stop", "cancelled (timeout, revoke or shutdown)", backtrace(e), false))
        finished = true
        raise
      rescue Exception => e # rubocop:disable Lint/RescueException
        failed(context, e, event, timer ? :on_timer : :on_message)
        finished = true
      end
    ensure
      # Interrupted before the outcome was reported (e.g. Async::Stop while the failure was
      # being classified): still return the permit and report a transient failure. Reporting
      # twice is harmless: a job's outcome is sent once.
      unless finished
        completed(@bridge.fail(context, "Async::Stop", "interrupted before the outcome was reported", "", false))
      end
      Thread.current[Tracing::CURRENT] = nil
      running.delete(id)
    end

    # Calls on_timer or on_message; inside the engine span's OpenTelemetry context when the gem
    # was loaded before subscribe.
    def call_handler(context, event, timer)
      if @opentelemetry
        Tracing.within(context) { timer ? @handler.on_timer(context, event) : @handler.on_message(context, event) }
      elsif timer
        @handler.on_timer(context, event)
      else
        @handler.on_message(context, event)
      end
    end

    # Reports the outcome first (nothing here may yield before the job is finished), then logs.
    def failed(context, error, event, method_name)
      kind = classify(method_name, error)
      completed(@bridge.fail(context, error.class.name.to_s, error.message.to_s, backtrace(error), kind == :permanent))
      report(error, event, kind)
    end

    def classify(method_name, error)
      @handler.class.failure_kind(method_name, error)
    rescue StandardError => e
      # A broken classification counts the failure as transient.
      Prosody.log(Logger::ERROR, "could not classify #{error.class}: #{e.class}: #{e.message}")
      :transient
    end

    def backtrace(error)
      (error.backtrace || []).first(20).join("\n")
    end

    # Outcomes are buffered natively and sent in batches (each send may wake an engine thread).
    # The first buffered outcome schedules a flush for the reactor's next turn, which comes as
    # soon as the running fiber yields.
    def completed(first)
      @flush.signal(true) if first
    end

    # The engine logs one line per failure (WARN or ERROR, with what it does next); the backtrace
    # goes to DEBUG, so a failing dependency does not flood the log.
    def report(error, event, kind)
      return unless Prosody.logger.debug?

      where = case event
              when Message
                "topic=#{event.topic} partition=#{event.partition} offset=#{event.offset} key=#{event.key.inspect}"
              when Timer then "timer key=#{event.key.inspect} time=#{event.time.utc}"
              else "unknown event"
              end
      trace = (error.backtrace || []).first(20).join("\n  ")
      Prosody.log(Logger::DEBUG, "handler failed #{where} (#{kind}): #{error.class}: #{error.message}\n  #{trace}")
    end
  end
end

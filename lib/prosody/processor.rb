# frozen_string_literal: true

module Prosody
  # @api private
  #
  # Runs the handler calls of one subscription on its own Ruby thread inside an Async reactor.
  #
  # The engine pushes jobs into a native bridge and wakes this thread through a pipe only when it
  # sleeps. The main fiber drains the whole batch with the GVL held, and a fixed pool of
  # long-lived worker tasks (one per permit) runs the handlers, so a handler that does I/O yields
  # to the others. Reusing tasks is an order of magnitude cheaper than a task per message; a
  # cancelled job stops its worker, and a replacement worker takes its place.
  class Processor
    # @return [Thread, nil] the processor thread
    attr_reader :thread

    # @param bridge [Prosody::Native::Bridge]
    # @param handler [Prosody::EventHandler]
    # @param concurrency [Integer] worker tasks, equal to the engine's permits
    def initialize(bridge, handler, concurrency)
      @bridge = bridge
      @handler = handler
      @concurrency = concurrency
      @thread = nil
    end

    # Starts the processor thread.
    def start
      @thread = Thread.new { run }
      @thread.name = "prosody-processor"
      self
    end

    # Closes the bridge and waits for the thread. Call after the engine stopped dispatching.
    def stop
      @bridge.close
      @thread&.join
      nil
    end

    private

    def run
      io = IO.for_fd(@bridge.fd, autoclose: false)
      Async do |task|
        queue = Async::Queue.new
        running = {}
        workers = Array.new(@concurrency) { spawn_worker(task, queue, running) }
        while (batch = @bridge.drain)
          if batch.empty?
            io.wait_readable
            next
          end
          batch.each do |item|
            if item.is_a?(Integer)
              workers = cancel(item, running, workers, task, queue)
            else
              queue.enqueue(item)
            end
          end
        end
        workers.each(&:stop)
      end
    rescue Exception => e # rubocop:disable Lint/RescueException
      Prosody.logger.error("prosody processor stopped unexpectedly: #{e.class}: #{e.message}")
    ensure
      @bridge.close
    end

    def spawn_worker(task, queue, running)
      task.async do |worker|
        while (job = queue.dequeue)
          run_job(job, worker, running)
        end
      end
    end

    # Stops the worker running job +id+ (it receives Async::Stop at its yield point) and starts a
    # replacement. A job already finished is left alone.
    def cancel(id, running, workers, task, queue)
      worker = running[id]
      return workers unless worker

      worker.stop
      workers - [worker] + [spawn_worker(task, queue, running)]
    end

    def run_job(job, worker, running)
      running[job.id] = worker
      message = job.message
      context = job.context
      begin
        @handler.on_message(context, message)
        job.succeed
      rescue Async::Stop
        job.fail("Async::Stop", "cancelled", false)
        raise
      rescue Exception => e # rubocop:disable Lint/RescueException
        report(e, message)
        job.fail(e.class.name.to_s, e.message.to_s, false)
      end
    ensure
      running.delete(job.id)
    end

    def report(error, message)
      where = if message
                "topic=#{message.topic} partition=#{message.partition} offset=#{message.offset} " \
                  "key=#{message.key.inspect}"
              else
                "unknown event"
              end
      trace = (error.backtrace || []).first(10).join("\n  ")
      Prosody.logger.error("handler failed #{where}: #{error.class}: #{error.message}\n  #{trace}")
    end
  end
end

# frozen_string_literal: true

# Module-level logging: Prosody.logger and the thread that delivers engine records to it.
module Prosody
  class << self
    # The logger that receives Prosody's log lines, engine lines included.
    # Defaults to a Logger on $stdout at INFO.
    #
    # @return [Logger]
    def logger
      @logger ||= default_logger
    end

    # Replaces the logger; takes effect at once, also for running clients. +nil+ restores the
    # default.
    #
    # @param logger [Logger, nil]
    def logger=(logger)
      @logger = logger || default_logger
      sync_log_level
    end

    # @api private
    # Logs +message+ with +severity+ and the progname "prosody", as engine lines have.
    def log(severity, message)
      logger.add(severity, message, "prosody")
    end

    # @api private
    # Starts the thread that hands engine log records to {logger}, once per process.
    def start_log_pump
      return if @log_pump&.alive?

      LOG_PUMP_LOCK.synchronize do
        return if @log_pump&.alive?

        sync_log_level
        io = IO.for_fd(Native.log_fd, autoclose: false)
        @log_pump = Thread.new { pump_logs(io) }
        @log_pump.name = "prosody-log"
      end
    end

    # @api private
    # Delivers buffered engine records now (also done at exit).
    def flush_logs
      Native.drain_logs.each { |severity, line| logger.add(severity, line, "prosody") }
    rescue StandardError => e
      warn "prosody: could not deliver engine logs: #{e.class}: #{e.message}"
    end

    private

    def default_logger
      Logger.new($stdout, level: Logger::INFO)
    end

    def sync_log_level
      Native.log_level = logger.respond_to?(:level) ? logger.level : Logger::INFO
    end

    def pump_logs(io)
      loop do
        io.wait_readable
        flush_logs
      end
    end
  end

  LOG_PUMP_LOCK = Mutex.new
  private_constant :LOG_PUMP_LOCK
end

at_exit { Prosody.flush_logs }

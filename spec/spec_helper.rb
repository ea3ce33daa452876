# frozen_string_literal: true

$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
require "English"
require "prosody"
require "securerandom"
require "stringio"
require "timeout"

Dir[File.join(__dir__, "support", "*.rb")].each { |f| require f }

# No probe server unless a spec asks for one (spec/probe_spec.rb): clients on the real broker
# would otherwise all start one on 0.0.0.0:8000, and child processes would fight over the port.
ENV["PROSODY_PROBE_PORT"] ||= "none"

RSpec.configure do |config|
  config.include SpecHelpers
  config.disable_monkey_patching!
  config.order = :random
  Kernel.srand config.seed
  # spec/gc_stress_spec.rb is slow; `make test-gc-stress` runs it on its own.
  config.filter_run_excluding :gc_stress unless ENV["PROSODY_GC_STRESS"]

  # Engine and handler logs go to a buffer that specs can inspect; printed for failures.
  config.before do
    @log_io = StringIO.new
    Prosody.logger = Logger.new(@log_io, level: Logger::INFO)
  end
  config.after { @clients&.each(&:unsubscribe) }
end

# After SpecHelpers is included: for :kafka examples, KafkaHelpers (included later) overrides
# its client_for with a client on the real broker.
require_relative "integration/kafka_helper"

# frozen_string_literal: true

# What the benchmarks share: the clock, filling a mock topic, timing a subscription, and running
# a raw librdkafka program (core/examples) for the figure to compare with.

require "English"
require "etc"
require "prosody"
require "securerandom"

Prosody.logger = Logger.new($stderr, level: Logger::WARN)
# No probe server: a benchmark on the local broker would otherwise listen on 0.0.0.0:8000.
ENV["PROSODY_PROBE_PORT"] ||= "none"

# The path of a release build of core/examples/+name+ (or what +env+ names).
def example_binary(name, env)
  ENV.fetch(env) do
    File.join(ENV.fetch("CARGO_TARGET_DIR", "/var/cache/prosody/target"), "release/examples", name)
  end
end

def monotonic
  Process.clock_gettime(Process::CLOCK_MONOTONIC)
end

# Writes +count+ records +{"id":i,"ok":true}+ over +keys+ keys to a new mock topic.
def fill(topic, partitions, count, keys)
  Prosody::Native.mock_create_topic(topic, partitions)
  producer = Prosody::Native::RawProducer.new(Prosody::Native.mock_bootstrap_servers)
  count.times do |i|
    producer.produce(topic, nil, "k#{i % keys}", %({"id":#{i},"ok":true}), {})
  end
  producer.flush(120)
end

# Subscribes +client+ with +handler+ (which answers +wait+ after +count+ calls and +first_call+)
# and returns the rates from subscribe (start-up included) and from the first handler call.
def subscription_rates(client, handler, count)
  GC.start # every measurement starts from a collected heap, whatever ran before it
  started = monotonic
  client.subscribe(handler)
  handler.wait
  finished = monotonic
  client.unsubscribe
  [count / (finished - started), count / (finished - handler.first_call)]
end

# Runs the raw program +binary+ with +args+ and returns the messages_per_second it printed.
def raw_rate(binary, *args)
  out = IO.popen([binary, *args.map(&:to_s)], &:read)
  raise "#{File.basename(binary)} failed: #{out}" unless $CHILD_STATUS.success?

  Float(out[/messages_per_second=([\d.]+)/, 1])
end

# Counts handler calls; the +target+th signals the thread waiting in +wait+. Subclasses define
# +work(message)+.
class BenchHandler < Prosody::EventHandler
  # @return [Float, nil] monotonic time of the first call
  attr_reader :first_call

  def initialize(target)
    super()
    @target = target
    @count = 0
    @done = Queue.new
  end

  def on_message(_context, message)
    @first_call ||= monotonic
    work(message)
    @count += 1
    @done << true if @count == @target
  end

  def wait
    @done.pop
  end
end

# frozen_string_literal: true

# Timer benchmark through the public API. Prints:
#   - in memory (mock mode): schedule-and-fire throughput (handlers schedule timers that are
#     already due; measured from subscribe until every timer's on_timer ran), and firing
#     lateness p50/p99 for timers scheduled 2-3 s ahead;
#   - with Cassandra (needs dev/services; skipped with a note when PROSODY_BENCH_CASSANDRA=0):
#     schedule throughput of 32 concurrent handlers (first schedule call to last), and firing
#     lateness p50/p99.
#
# Usage: ruby -Ilib bench/timers.rb   (make bench-timers builds everything first)

require "etc"
require "prosody"
require "securerandom"

Prosody.logger = Logger.new($stderr, level: Logger::WARN)
KEYS = 1_000
TIMERS_PER_MESSAGE = Integer(ENV.fetch("TIMERS_PER_MESSAGE", 50))

def monotonic
  Process.clock_gettime(Process::CLOCK_MONOTONIC)
end

def percentile(values, fraction)
  sorted = values.sort
  sorted[[(sorted.size * fraction).floor, sorted.size - 1].min]
end

# Each message schedules timers for its key; on_timer records when each fired.
class TimerBench < Prosody::EventHandler
  attr_reader :first_schedule, :last_scheduled

  def initialize(expected, offsets)
    super()
    @expected = expected
    @offsets = offsets
    @fired = []
    @done = Queue.new
    @first_schedule = nil
    @last_scheduled = nil
    @scheduled = Queue.new
  end

  def on_message(context, message)
    base = message.payload["base"]
    @first_schedule ||= monotonic
    @offsets.each { |offset| context.schedule(Time.at(base + offset)) }
    @last_scheduled = monotonic
    @scheduled << @offsets.size
  end

  def on_timer(_context, timer)
    @fired << (Time.now.to_f - timer.time.to_f)
    @done << true if @fired.size == @expected
  end

  def wait = @done.pop
  def lateness = @fired
  def scheduled_count = @scheduled.size
end

def run(topic, options, offsets, base)
  Prosody::Native.mock_create_topic(topic, 4) if options[:mock]
  expected = KEYS * offsets.size
  handler = TimerBench.new(expected, offsets)
  client = Prosody::Client.new(group_id: "bench-#{SecureRandom.hex(4)}", subscribed_topics: topic,
                               send_timeout: 15, **options)
  bootstrap = options[:mock] ? Prosody::Native.mock_bootstrap_servers : options[:bootstrap_servers]
  producer = Prosody::Native::RawProducer.new(bootstrap)
  KEYS.times { |k| producer.produce(topic, nil, "key-#{k}", %({"base":#{base}}), {}) }
  producer.flush(60)
  GC.start
  started = monotonic
  client.subscribe(handler)
  handler.wait
  elapsed = monotonic - started
  client.unsubscribe
  [expected, elapsed, handler]
end

puts "Prosody timer benchmark (Ruby #{RUBY_VERSION}, #{Etc.nprocessors} cores, #{KEYS} keys)"

past = Array.new(TIMERS_PER_MESSAGE) { |i| -(i + 1) } # already due: fire at once
count, elapsed, = run("bench-timers-#{SecureRandom.hex(4)}", { mock: true }, past, Time.now.to_i)
puts format("memory: schedule-and-fire %<rate>8.0f timers/s (%<count>d timers in %<s>.2f s)",
            rate: count / elapsed, count:, s: elapsed)

ahead = [2, 3]
_, _, handler = run("bench-timers-#{SecureRandom.hex(4)}", { mock: true }, ahead, Time.now.to_i)
puts format("memory: firing lateness p50 %<p50>.3f s, p99 %<p99>.3f s (%<n>d timers 2-3 s ahead)",
            p50: percentile(handler.lateness, 0.5), p99: percentile(handler.lateness, 0.99),
            n: handler.lateness.size)

if ENV["PROSODY_BENCH_CASSANDRA"] == "0"
  puts "cassandra: skipped (PROSODY_BENCH_CASSANDRA=0)"
else
  topic = "bench-timers-#{SecureRandom.hex(4)}"
  Prosody::Native.create_topic("127.0.0.1:9092", topic, 4)
  options = { bootstrap_servers: "127.0.0.1:9092", cassandra_nodes: "127.0.0.1:9042",
              cassandra_keyspace: "prosody_bench" }
  ahead = Array.new(5) { |i| 8 + i }
  count, _, handler = run(topic, options, ahead, Time.now.to_i)
  puts format("cassandra: schedule %<rate>8.0f timers/s (%<count>d timers from 32 concurrent handlers, " \
              "first schedule call to last)",
              rate: count / (handler.last_scheduled - handler.first_schedule), count:)
  puts format("cassandra: firing lateness p50 %<p50>.3f s, p99 %<p99>.3f s",
              p50: percentile(handler.lateness, 0.5), p99: percentile(handler.lateness, 0.99))
end

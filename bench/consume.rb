# frozen_string_literal: true

# Consume benchmark on the in-process librdkafka mock cluster. Prints, from one run:
#   - Prosody with a Ruby handler that reads message.payload vs a raw rdkafka consumer in Rust
#     (no handler) on the same mock cluster, with 1 and 4 partitions, and the ratio;
#   - deduplication's cost: the same handler with deduplication on (the default; every payload has
#     a unique id, so each message misses the cache, asks the store and is recorded) and off
#     (idempotence_cache_size: 0), alternated on the same 4-partition topic, and the ratio of the
#     bests;
#   - the telemetry emitter's cost: the same handler with telemetry_enabled and without, alternated;
#   - a handler doing 1 ms of I/O (sleep 0.001) with max_concurrency 32 over 1,000 keys, against
#     the bound of 32 / 1 ms = 32k msg/s, and against what async itself reaches on this machine in
#     the same run: 32 bare tasks, each sleeping 1 ms in a loop, on a reactor like the processor's.
#
# Usage: ruby -Ilib bench/consume.rb [MESSAGES]   (make bench builds everything first)

require_relative "support"

MESSAGES = Integer(ARGV[0] || 200_000)
# librdkafka's mock keeps at most 100,000 messages (and 5 MB) per partition and silently drops the
# oldest beyond that (rdkafka_mock.c), so a single-partition run uses the most it can hold.
MOCK_PARTITION_CAP = 99_000
IO_MESSAGES = Integer(ENV.fetch("IO_MESSAGES", 64_000))
RAW = example_binary("raw_consumer", "RAW_CONSUMER")

# Reads the payload, and with +io+ does 1 ms of I/O.
class CountingHandler < BenchHandler
  def initialize(target, io: false)
    super(target)
    @io = io
  end

  def work(message)
    message.payload
    sleep 0.001 if @io
  end
end

def prosody_rate(topic, count, io: false, max_concurrency: 32, **options)
  handler = CountingHandler.new(count, io:)
  client = Prosody::Client.new(mock: true, group_id: "bench-#{SecureRandom.hex(4)}", subscribed_topics: topic,
                               max_concurrency:, **options)
  subscription_rates(client, handler, count)
end

puts "Prosody consume benchmark (mock cluster, #{MESSAGES} messages, Ruby #{RUBY_VERSION}, " \
     "async #{Async::VERSION}, #{Etc.nprocessors} cores)"
[1, 4].each do |partitions|
  count = [MESSAGES, MOCK_PARTITION_CAP * partitions].min
  topic = "bench-#{partitions}p-#{SecureRandom.hex(4)}"
  fill(topic, partitions, count, 10_000)
  raw = raw_rate(RAW, Prosody::Native.mock_bootstrap_servers, topic, count)
  ours, = prosody_rate(topic, count)
  puts format("%<partitions>d partition(s), %<count>d messages: prosody %<ours>8.0f msg/s | " \
              "raw rdkafka %<raw>8.0f msg/s | ratio %<ratio>.2f",
              partitions:, count:, ours:, raw:, ratio: ours / raw)
end

dedup_count = [MESSAGES, MOCK_PARTITION_CAP * 4].min
dedup_topic = "bench-dedup-#{SecureRandom.hex(4)}"
fill(dedup_topic, 4, dedup_count, 10_000)
rounds = Integer(ENV.fetch("DEDUP_ROUNDS", 4))

# Runs +variants+ ({off: options, on: options}) alternately +rounds+ times on the dedup topic and
# prints each rate and the ratio of the bests under +label+.
def alternate(label, rounds, topic, count, variants)
  best = { on: 0.0, off: 0.0 }
  rounds.times do
    variants.each do |mode, options|
      rate, = prosody_rate(topic, count, **options)
      best[mode] = [best[mode], rate].max
      puts format("  %<label>s %<mode>-3s %<rate>8.0f msg/s", label:, mode:, rate:)
    end
  end
  puts format("%<label>s, 4 partitions, %<count>d messages: on %<on>8.0f msg/s | off %<off>8.0f msg/s | " \
              "ratio %<ratio>.2f (best of %<rounds>d each, alternated)",
              label:, count:, on: best[:on], off: best[:off], ratio: best[:on] / best[:off], rounds:)
end

alternate("deduplication", rounds, dedup_topic, dedup_count, off: { idempotence_cache_size: 0 }, on: {})
# Telemetry's cost: the same handler with the emitter on (every message sends message.received
# and message.succeeded to the telemetry topic) and off (deduplication off in both).
alternate("telemetry", rounds, dedup_topic, dedup_count,
          off: { idempotence_cache_size: 0 },
          on: { idempotence_cache_size: 0, telemetry_enabled: true,
                telemetry_topic: "bench-telemetry-#{SecureRandom.hex(4)}" })

# What the reactor alone allows: 32 tasks, each sleeping 1 ms IO_MESSAGES / 32 times, on a
# reactor made the way the processor makes its own (same selector).
def async_ceiling(count)
  started = monotonic
  Prosody::AsyncRuntime.run do |task|
    Array.new(32) { task.async { (count / 32).times { sleep 0.001 } } }.each(&:wait)
  end
  count / (monotonic - started)
end

topic = "bench-io-#{SecureRandom.hex(4)}"
fill(topic, 4, IO_MESSAGES, 1_000)
io_rate, io_steady = prosody_rate(topic, IO_MESSAGES, io: true, max_concurrency: 32)
puts format("1 ms I/O handler, max_concurrency 32, 1000 keys, %<count>d messages: %<rate>8.0f msg/s | " \
            "bound 32000 msg/s | %<share>.0f%% of bound",
            count: IO_MESSAGES, rate: io_rate, share: io_rate / 32_000 * 100)
ceiling = async_ceiling(IO_MESSAGES)
puts format("  from the first handler call: %<steady>8.0f msg/s (%<share>.0f%% of bound)",
            steady: io_steady, share: io_steady / 32_000 * 100)
puts format("  async alone, 32 tasks sleeping 1 ms: %<ceiling>8.0f sleeps/s (%<share>.0f%% of bound); " \
            "prosody from the first call reaches %<ratio>.0f%% of it",
            ceiling:, share: ceiling / 32_000 * 100, ratio: io_steady / ceiling * 100)

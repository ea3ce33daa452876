# frozen_string_literal: true

# Latency on the local Kafka (dev/services): a producer writes RATE records per second at a steady
# pace (one every 1/RATE s, each carrying its send time) to a 4-partition topic over 1,000 keys, and
# a subscribed client's handler notes, as its first step, how long after the send it started. After
# a warm-up (one-second rounds until WARM_STREAK in a row have their p99 under WARM_P99_MS, at most
# WARM_LIMIT rounds: the new group's first fetch waits for its offsets, and a Cassandra started
# moments ago answers slowly until its JIT has warmed), prints p50, p99 and the maximum of produce
# -> handler start over SECONDS seconds, with the client's defaults (deduplication through the local
# Cassandra included) and with deduplication off (idempotence_cache_size: 0). Sends go through a raw
# librdkafka producer that does not linger (Prosody's own lingers 1 ms), so the figures are the
# broker's and the consumer's side.
#
# Usage: ruby -Ilib bench/latency.rb [SECONDS] [RATE]   (make bench starts the services first)

require_relative "support"

SECONDS = Float(ARGV[0] || 10)
RATE = Integer(ARGV[1] || 1_000)
BOOTSTRAP = ENV.fetch("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
CASSANDRA = ENV.fetch("CASSANDRA_NODES", "127.0.0.1:9042")
WARM_P99_MS = 50
WARM_STREAK = 3
WARM_LIMIT = 90

def wall_us
  Process.clock_gettime(Process::CLOCK_REALTIME, :float_microsecond)
end

# Notes each message's delay from its send time to the handler's start.
class LatencyHandler < Prosody::EventHandler
  # @return [Array<Float>] microseconds, in arrival order
  attr_reader :delays

  def initialize
    super
    @delays = []
  end

  def on_message(_context, message)
    started = wall_us
    @delays << (started - message.payload["sent"])
  end

  # Waits until +count+ delays are noted, then returns them and starts a new list.
  def take(count, timeout)
    deadline = monotonic + timeout
    sleep 0.01 until @delays.size >= count || monotonic > deadline
    raise "only #{@delays.size} of #{count} messages arrived within #{timeout} s" if @delays.size < count

    taken = @delays
    @delays = []
    taken
  end
end

def percentile(sorted, fraction)
  sorted[((sorted.size - 1) * fraction).round]
end

# Writes +count+ records to +topic+, one every 1/RATE s, with ids from +first_id+ (unique, or
# deduplication would skip them); returns the rate kept.
def paced_send(topic, count, first_id)
  producer = Prosody::Native::RawProducer.unbatched(BOOTSTRAP)
  interval = 1.0 / RATE
  start = monotonic
  count.times do |i|
    pause = start + (i * interval) - monotonic
    sleep pause if pause.positive?
    producer.produce(topic, nil, "k#{i % 1_000}", %({"id":"#{topic}-#{first_id + i}","sent":#{wall_us}}), {})
  end
  count / (monotonic - start)
end

def measure(label, **options)
  topic = "bench-latency-#{SecureRandom.hex(4)}"
  Prosody::Native.create_topic(BOOTSTRAP, topic, 4)
  count = (SECONDS * RATE).to_i
  handler = LatencyHandler.new
  client = Prosody::Client.new(bootstrap_servers: BOOTSTRAP, group_id: "bench-#{SecureRandom.hex(4)}",
                               subscribed_topics: topic, cassandra_nodes: CASSANDRA,
                               cassandra_keyspace: "prosody_bench", **options)
  client.subscribe(handler)
  sleep 0.05 until client.assigned_partitions == 4
  warm = warm_up(topic, handler)
  sent_rate = paced_send(topic, count, warm * RATE)
  sorted = handler.take(count, 60).sort
  client.unsubscribe
  puts format("  %<label>-34s p50 %<p50>6.2f ms | p99 %<p99>6.2f ms | max %<max>7.2f ms " \
              "(%<count>d messages at %<sent_rate>.0f msg/s, after %<warm>d s of warm-up)",
              label:, count:, sent_rate:, warm:, p50: percentile(sorted, 0.5) / 1e3,
              p99: percentile(sorted, 0.99) / 1e3, max: sorted.last / 1e3)
end

# Sends one-second rounds until WARM_STREAK in a row have their p99 under WARM_P99_MS; returns the
# rounds sent.
def warm_up(topic, handler)
  streak = 0
  (1..WARM_LIMIT).each do |round|
    paced_send(topic, RATE, (round - 1) * RATE)
    streak = percentile(handler.take(RATE, 60).sort, 0.99) < WARM_P99_MS * 1e3 ? streak + 1 : 0
    return round if streak == WARM_STREAK
  end
  raise "still not warm after #{WARM_LIMIT} s (p99 under #{WARM_P99_MS} ms for fewer than #{WARM_STREAK} s in a row)"
end

puts "Prosody latency benchmark (Kafka #{BOOTSTRAP}, Cassandra #{CASSANDRA}, #{RATE} msg/s for #{SECONDS} s, " \
     "produce -> handler start, #{Etc.nprocessors} cores)"
measure("defaults (dedup via Cassandra)")
measure("deduplication off", idempotence_cache_size: 0)

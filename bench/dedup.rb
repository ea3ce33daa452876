# frozen_string_literal: true

# Deduplication against the local Kafka and Cassandra (dev/services): a handler that reads the
# payload consumes MESSAGES records with unique ids (4 partitions, 1,000 keys) with
# deduplication on (each message misses the cache: one Cassandra read before its handler, one
# write after it, batched per partition) and off (idempotence_cache_size: 0), alternated, and
# prints msg/s and the ratio of the bests. Then the same for one hot key (ONE_KEY messages on one
# partition): each message's lookup is read ahead as its record arrives, so the key does not
# wait a Cassandra round trip per message.
#
# Usage: ruby -Ilib bench/dedup.rb [MESSAGES]   (make bench-dedup starts the services first)

require_relative "support"

MESSAGES = Integer(ARGV[0] || 50_000)
BOOTSTRAP = ENV.fetch("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
CASSANDRA = ENV.fetch("CASSANDRA_NODES", "127.0.0.1:9042")
ROUNDS = Integer(ENV.fetch("DEDUP_ROUNDS", 2))

# Reads the payload.
class ReadingHandler < BenchHandler
  def work(message)
    message.payload
  end
end

topic = "bench-dedup-#{SecureRandom.hex(4)}"
Prosody::Native.create_topic(BOOTSTRAP, topic, 4)
producer = Prosody::Native::RawProducer.new(BOOTSTRAP)
MESSAGES.times { |i| producer.produce(topic, nil, "k#{i % 1_000}", %({"id":"#{topic}-#{i}","ok":true}), {}) }
producer.flush(120)

ONE_KEY = Integer(ENV.fetch("ONE_KEY", 5_000))

def rate(topic, count, **options)
  handler = ReadingHandler.new(count)
  client = Prosody::Client.new(bootstrap_servers: BOOTSTRAP, group_id: "bench-#{SecureRandom.hex(4)}",
                               subscribed_topics: topic, cassandra_nodes: CASSANDRA,
                               cassandra_keyspace: "prosody_bench", **options)
  subscription_rates(client, handler, count)
end

puts "Prosody deduplication benchmark (Kafka #{BOOTSTRAP}, Cassandra #{CASSANDRA}, #{MESSAGES} messages, " \
     "#{Etc.nprocessors} cores)"
best = { on: 0.0, off: 0.0 }
ROUNDS.times do
  { off: { idempotence_cache_size: 0 }, on: {} }.each do |mode, options|
    rate, steady = rate(topic, MESSAGES, **options)
    best[mode] = [best[mode], steady].max
    puts format("  dedup %<mode>-3s %<rate>8.0f msg/s from subscribe, %<steady>8.0f msg/s from the first call",
                mode:, rate:, steady:)
  end
end
puts format("deduplication with Cassandra, 4 partitions, %<count>d messages with unique ids: on %<on>8.0f msg/s | " \
            "off %<off>8.0f msg/s | ratio %<ratio>.2f (best of %<rounds>d each, from the first handler call)",
            count: MESSAGES, on: best[:on], off: best[:off], ratio: best[:on] / best[:off], rounds: ROUNDS)

hot = "bench-dedup-hot-#{SecureRandom.hex(4)}"
Prosody::Native.create_topic(BOOTSTRAP, hot, 1)
ONE_KEY.times { |i| producer.produce(hot, nil, "hot", %({"id":"#{hot}-#{i}","ok":true}), {}) }
producer.flush(120)
_, off = rate(hot, ONE_KEY, idempotence_cache_size: 0)
_, on = rate(hot, ONE_KEY)
puts format("deduplication with Cassandra, one key, %<count>d messages with unique ids: on %<on>8.0f msg/s | " \
            "off %<off>8.0f msg/s | ratio %<ratio>.2f (from the first handler call)",
            count: ONE_KEY, on:, off:, ratio: on / off)

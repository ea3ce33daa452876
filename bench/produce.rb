# frozen_string_literal: true

# Produce benchmark on the in-process librdkafka mock cluster. Prints, from one run:
#   - the round trip of a lone send_message (median of 200, sent one after another from a fiber);
#   - consume → transform → produce: a handler that sends one record per message it handles
#     (4 partitions, 20,000 messages, max_concurrency 32), against the bound of 32 handlers each
#     waiting for its own acknowledgement, 32 / median round trip;
#   - send_messages of 50,000 records against a raw librdkafka producer (Rust, same idempotence
#     and linger) writing the same records to the same cluster: three rounds, alternated, each
#     printed, and the ratio of the best of each (this VM's speed moves by half within seconds).
# With KAFKA_BOOTSTRAP set (e.g. 127.0.0.1:9092 after `dev/services start kafka`), the batch
# figures are measured against that broker too.
#
# Usage: ruby -Ilib bench/produce.rb   (make bench builds everything first)

require_relative "support"

PIPELINE_MESSAGES = Integer(ENV.fetch("PIPELINE_MESSAGES", 20_000))
BATCH_RECORDS = Integer(ENV.fetch("BATCH_RECORDS", 50_000))
RAW = example_binary("raw_producer", "RAW_PRODUCER")

# Sends one record per message it handles.
class TransformHandler < BenchHandler
  def initialize(client, out_topic, target)
    super(target)
    @client = client
    @out_topic = out_topic
  end

  def work(message)
    @client.send_message(@out_topic, message.key, { "id" => message.payload["id"], "seen" => true })
  end
end

def lone_round_trip(client, topic)
  times = []
  Async do
    200.times do |i|
      started = monotonic
      client.send_message(topic, "k#{i}", { "id" => i })
      times << (monotonic - started)
    end
  end
  times.sort[times.size / 2]
end

def pipeline_rate(topic, out_topic, count)
  fill(topic, 4, count, 1000)
  client = Prosody::Client.new(mock: true, group_id: "bench-#{SecureRandom.hex(4)}", subscribed_topics: topic,
                               max_concurrency: 32)
  subscription_rates(client, TransformHandler.new(client, out_topic, count), count)
end

def records(topic, count)
  Array.new(count) { |i| { topic:, key: "k#{i % 10_000}", payload: { "id" => i, "ok" => true } } }
end

def batch_rate(client, topic, count)
  batch = records(topic, count)
  client.send_messages(records(topic, 10)) # topic known, producer warm
  GC.start
  started = monotonic
  client.send_messages(batch)
  count / (monotonic - started)
end

ROUNDS = Integer(ENV.fetch("BATCH_ROUNDS", 3))

# Alternates send_messages on +client+ and the raw producer against +bootstrap+, ROUNDS times
# each, and prints every round and the ratio of the bests.
def compare_batch(label, client, bootstrap, topic)
  rounds = Array.new(ROUNDS) do
    [batch_rate(client, topic, BATCH_RECORDS), raw_rate(RAW, bootstrap, topic, BATCH_RECORDS)]
  end
  shown = rounds.map { |ours, raw| format("%<ours>.0f/%<raw>.0f", ours:, raw:) }.join(", ")
  ours = rounds.map(&:first).max
  raw = rounds.map(&:last).max
  puts format("send_messages, %<count>d records (%<label>s): prosody %<ours>8.0f msg/s | " \
              "raw rdkafka producer %<raw>8.0f msg/s | ratio %<ratio>.2f " \
              "(best of %<n>d each; rounds prosody/raw: %<shown>s)",
              count: BATCH_RECORDS, label:, ours:, raw:, ratio: ours / raw, n: ROUNDS, shown:)
end

puts "Prosody produce benchmark (mock cluster, Ruby #{RUBY_VERSION}, async #{Async::VERSION}, #{Etc.nprocessors} cores)"
client = Prosody::Client.new(mock: true)
rtt = lone_round_trip(client, "bench-rtt-#{SecureRandom.hex(4)}")
bound = 32 / rtt
total, steady = pipeline_rate("bench-in-#{SecureRandom.hex(4)}", "bench-out-#{SecureRandom.hex(4)}", PIPELINE_MESSAGES)
puts format("lone send_message round trip (median of 200): %<ms>.2f ms", ms: rtt * 1000)
puts format("consume → transform → produce, max_concurrency 32, %<count>d messages: %<steady>8.0f msg/s " \
            "from the first call (%<total>.0f from subscribe) | bound 32 / round trip %<bound>8.0f msg/s | " \
            "ratio %<ratio>.2f",
            count: PIPELINE_MESSAGES, steady:, total:, bound:, ratio: steady / bound)

topic = "bench-batch-#{SecureRandom.hex(4)}"
Prosody::Native.mock_create_topic(topic, 4)
compare_batch("mock", client, Prosody::Native.mock_bootstrap_servers, topic)

if (kafka = ENV.fetch("KAFKA_BOOTSTRAP", nil))
  real = Prosody::Client.new(bootstrap_servers: kafka, send_timeout: 30)
  topic = "bench-batch-#{SecureRandom.hex(4)}"
  real.send_message(topic, "k", {}) # created by the broker (auto-create), leaders known
  compare_batch("broker #{kafka}", real, kafka, topic)
end

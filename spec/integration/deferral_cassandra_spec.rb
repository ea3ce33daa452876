# frozen_string_literal: true

require "json"

# Deferred retry against a real Kafka and Cassandra: deferred keys survive a killed process and a
# client leaving; nothing is lost, each key's messages run in order.
RSpec.describe "deferred retry with a real Kafka and Cassandra", :kafka, :cassandra do
  let(:topic) { create_topic(unique("defer-it")) }
  let(:keyspace) { unique("prosody_it").tr("-", "_") }

  # Every key fails at first: a failure-rate threshold of 1.0 keeps deferral on throughout (the
  # default would stop deferring once nearly every call fails, see the mock spec).
  def cassandra_client(group, **options)
    kafka_client(topic, group:, cassandra_nodes: KafkaHelpers::CASSANDRA, cassandra_keyspace: keyspace,
                        defer_base: 0.2, defer_max_delay: 0.5, defer_failure_threshold: 1.0, **options)
  end

  def produce(keys, per_key)
    producer = raw_kafka_producer
    per_key.times do |seq|
      keys.times { |k| producer.produce(topic, nil, "key-#{k}", JSON.generate("seq" => seq), {}) }
    end
    producer.flush(30)
  end

  def expect_every_message_once_in_order(seen, keys, per_key)
    by_key = seen.group_by(&:first).transform_values { |pairs| pairs.map(&:last) }
    expect(by_key.size).to eq(keys)
    by_key.each do |key, seqs|
      expect(seqs).to eq((0...per_key).to_a), "#{key} ran #{seqs.inspect}"
    end
  end

  it "retries all of 100 deferred keys, in order and none lost, after the process that deferred them was killed" do
    group = unique("group")
    keys = 100
    per_key = 5
    produce(keys, per_key)
    log = run_child_until_killed("defer_child.rb",
                                 [KafkaHelpers::BOOTSTRAP, KafkaHelpers::CASSANDRA, keyspace, topic, group,
                                  keys, keys * (per_key - 1)],
                                 "ALL-DEFERRED", timeout: 90)
    expect(log.grep(/deferring its key/).size).to eq(keys)

    handler = SwitchHandler.new([])
    subscribe_tracked(cassandra_client(group), handler)
    wait_for(timeout: 90, message: "every message to run") { handler.seen.size >= keys * per_key }
    expect_every_message_once_in_order(handler.seen, keys, per_key)
  end

  it "loses nothing when one of two clients leaves while keys are deferred" do
    group = unique("group")
    keys = 20
    per_key = 5
    failing = (0...keys).map { |k| "key-#{k}" }
    first = SwitchHandler.new(failing)
    second = SwitchHandler.new(failing)
    a = subscribe_tracked(cassandra_client(group), first)
    b = subscribe_tracked(cassandra_client(group), second)
    wait_for(timeout: 30, message: "both clients to get partitions") do
      a.assigned_partitions.positive? && b.assigned_partitions.positive?
    end
    produce(keys, per_key)
    wait_for(timeout: 30, message: "every key deferred") { log_output.scan("deferring its key").size >= keys }
    a.unsubscribe
    failing.clear
    wait_for(timeout: 60, message: "every message to run") { second.seen.size >= keys * per_key }
    expect_every_message_once_in_order(first.seen + second.seen, keys, per_key)
  end
end

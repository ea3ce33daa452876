# frozen_string_literal: true

require "json"

# Deduplication against a real Kafka and Cassandra: the Cassandra records outlive a killed process
# and a cache too small to hold the ids, and expire after idempotence_ttl.
RSpec.describe "deduplication with a real Kafka and Cassandra", :kafka, :cassandra do
  let(:topic) { create_topic(unique("dedup-it"), partitions: 1) }
  let(:keyspace) { unique("prosody_it").tr("-", "_") }
  let(:group) { unique("group") }

  def cassandra_client(**options)
    kafka_client(topic, group:, cassandra_nodes: KafkaHelpers::CASSANDRA, cassandra_keyspace: keyspace, **options)
  end

  def produce(key, *payloads)
    producer = raw_kafka_producer
    payloads.each { |payload| producer.produce(topic, nil, key, JSON.generate(payload), {}) }
    producer.flush(30)
  end

  # Produces a marker without an id on key "k" and waits until +handler+ ran it: the key's
  # earlier messages were handled or skipped by then.
  def settle(handler, timeout: 30)
    marker = { "marker" => unique("m") }
    produce("k", marker)
    wait_for(timeout:, message: "the marker") { handler.succeeded("k").include?(marker) }
  end

  # What +handler+ ran successfully for key "k", markers left out.
  def handled(handler)
    handler.succeeded("k").reject { |payload| payload.key?("marker") }
  end

  it "skips a message redelivered after the process that handled it was killed before committing" do
    produce("k", { "id" => "a" }, { "id" => "b" })
    log = run_child_until_killed("dedup_child.rb",
                                 [KafkaHelpers::BOOTSTRAP, KafkaHelpers::CASSANDRA, keyspace, topic, group, 2],
                                 "RECORDED", timeout: 90)
    expect(log.grep(/\AHANDLED /)).to eq(["HANDLED a", "HANDLED b"])

    # The group's committed position is still before "a": both come again, and both are skipped.
    handler = SwitchHandler.new([])
    client = subscribe_tracked(cassandra_client, handler)
    produce("k", { "id" => "c" })
    settle(handler, timeout: 90)
    expect(handled(handler)).to eq([{ "id" => "c" }])
    expect(client.skipped_events[:duplicate]).to eq(2)
  end

  it "still deduplicates through Cassandra with a cache too small to hold the ids" do
    handler = SwitchHandler.new([])
    client = subscribe_tracked(cassandra_client(idempotence_cache_size: 1), handler)
    ids = (1..20).map { |i| { "id" => "id-#{i}" } }
    produce("k", *ids)
    settle(handler)
    produce("k", *ids)
    settle(handler)
    expect(handled(handler)).to eq(ids)
    expect(client.skipped_events[:duplicate]).to eq(20)
    # Copies in one go: each record's id is read ahead as it arrives, before the earlier copy ran.
    copies = %w[a b a c b a c].map { |id| { "id" => id } }
    produce("k", *copies)
    settle(handler)
    expect(handled(handler)).to eq(ids + copies.uniq)
    expect(client.skipped_events[:duplicate]).to eq(24)
  end

  it "handles an id again once its record expired (idempotence_ttl)" do
    handler = SwitchHandler.new([])
    subscribe_tracked(cassandra_client(idempotence_cache_size: 1, idempotence_ttl: 1), handler)
    produce("k", { "id" => "x" }, { "id" => "x" })
    settle(handler)
    handled_at = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    expect(handled(handler)).to eq([{ "id" => "x" }])
    # The record's lifetime is what this example is about: let it pass (Cassandra counts TTLs
    # in whole seconds).
    sleep 2.2 - (Process.clock_gettime(Process::CLOCK_MONOTONIC) - handled_at)
    produce("k", { "id" => "x" })
    settle(handler)
    expect(handled(handler)).to eq([{ "id" => "x" }] * 2)
  end
end

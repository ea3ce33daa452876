# frozen_string_literal: true

RSpec.describe "consuming from a real Kafka broker", :kafka do
  let(:topic) { create_topic(unique("it-topic")) }

  # Proves that a message sent with headers reaches a subscribed handler with them.
  it "round-trips a message with headers through send_message and a subscribed handler" do
    handler = SpecHelpers::RecordingHandler.new
    client = start(handler)
    client.send_message(topic, "key-1", { "hello" => ["kafka", 1, nil] }, headers: { "trace" => "abc" })
    wait_for(timeout: 30, message: "the message") { handler.count == 1 }
    message = handler.calls.first
    expect(message.payload).to eq("hello" => ["kafka", 1, nil])
    expect(message.headers).to eq("source-system" => "spec-producer", "trace" => "abc")
    expect(message.key).to eq("key-1")
    expect(message.topic).to eq(topic)
  end

  # Proves that the classic group protocol (cooperative-sticky, for brokers without KIP-848)
  # consumes and shares partitions between two clients too.
  it "works with the classic group protocol for brokers without KIP-848" do
    group = unique("group")
    first = SpecHelpers::RecordingHandler.new
    second = SpecHelpers::RecordingHandler.new
    a = start(first, group:, group_protocol: :classic)
    wait_for(timeout: 30, message: "the first assignment") { a.assigned_partitions == 4 }
    b = start(second, group:, group_protocol: "classic")
    wait_for(timeout: 30, message: "partitions to spread") do
      a.assigned_partitions.positive? && b.assigned_partitions.positive?
    end
    producer = raw_kafka_producer
    200.times { |i| producer.produce(topic, nil, "key-#{i % 20}", JSON.generate("i" => i), {}) }
    producer.flush(30)
    wait_for(timeout: 60, message: "every message") do
      (first.payloads + second.payloads).map do |p|
        p["i"]
      end.uniq.size == 200
    end
    expect(first.count).to be_positive
    expect(second.count).to be_positive
  end

  # Proves at-least-once delivery, per-key order and no overlap of a key across clients while
  # a third client joins mid-stream and one leaves.
  it "keeps order per key and never overlaps a key while clients join and leave" do
    group = unique("group")
    keys = 100
    per_key = 100
    log = SpecHelpers::KeyLog.new
    make_handler = lambda do
      SpecHelpers::RecordingHandler.new do |_context, message|
        log.start(message.key)
        sleep 0.0005 # yield to other handlers
        log.finish(message.key, message.payload["seq"])
      end
    end
    seen = -> { log.seen }
    producer = raw_kafka_producer
    produce = lambda do |range|
      range.each do |seq|
        keys.times { |k| producer.produce(topic, nil, "key-#{k}", JSON.generate("seq" => seq), {}) }
      end
      producer.flush(30)
    end

    first = start(make_handler.call, group:)
    second = start(make_handler.call, group:)
    produce.call(0...40)
    wait_for(timeout: 60, message: "a share of the first batch") { seen.call >= 2_000 }
    third = start(make_handler.call, group:)
    produce.call(40...70)
    wait_for(timeout: 60, message: "partitions to reach the third client") { third.assigned_partitions.positive? }
    first.unsubscribe
    produce.call(70...per_key)
    wait_for(timeout: 90, message: "every message") { seen.call == keys * per_key }

    expect(log.overlaps).to be_empty
    expect(second.assigned_partitions + third.assigned_partitions).to eq(4)
    log.order.each do |key, seqs|
      expect(seqs.uniq.sort).to eq((0...per_key).to_a), "key #{key} missed messages"
      bad_steps = seqs.each_cons(2).reject { |x, y| y == x + 1 || y <= x }
      expect(bad_steps).to be_empty, "key #{key} out of order: #{seqs.inspect}"
    end
  end

  # Proves that committed offsets survive a killed process: the replacement resumes from the
  # last commit, re-delivers at most the uncommitted tail, and skips nothing.
  it "resumes after a killed consumer from its last commit without skipping anything" do
    group = unique("group")
    total = 400
    producer = raw_kafka_producer
    total.times { |i| producer.produce(topic, nil, "key-#{i % 40}", JSON.generate("i" => i), {}) }
    producer.flush(30)

    lines = run_child_until_killed("kill_consumer.rb", [KafkaHelpers::BOOTSTRAP, topic, group, 150], "PAUSED")
    handled_before = lines.reject { |l| l == "PAUSED" }.map { |l| l.split.map(&:to_i) }
    # Handlers that passed the pause check before the 150th finished may add a few more.
    expect(handled_before.size).to be >= 150

    # Per partition, the finished prefix the child must have committed before it paused.
    committed = Hash.new(0)
    handled_before.group_by(&:first).each do |partition, pairs|
      offsets = pairs.map(&:last).sort
      committed[partition] += 1 while offsets.include?(committed[partition])
    end

    handler = SpecHelpers::RecordingHandler.new
    start(handler, group:)
    remaining = total - committed.values.sum
    wait_for(timeout: 60, message: "the uncommitted rest") { handler.count >= remaining }
    after = handler.calls.map { |m| [m.partition, m.offset] }

    expect((handled_before + after).uniq.size).to eq(total), "a message was skipped"
    after.group_by(&:first).each do |partition, pairs|
      expect(pairs.map(&:last).min).to eq(committed[partition]),
                                       "partition #{partition} did not resume at its commit"
    end
    redelivered = after & handled_before
    expect(redelivered.size).to be < handled_before.size
  end
end

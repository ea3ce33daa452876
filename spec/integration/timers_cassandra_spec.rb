# frozen_string_literal: true

RSpec.describe "timers stored in a real Cassandra", :kafka, :cassandra do
  let(:topic) { create_topic(unique("timer-it")) }
  let(:keyspace) { unique("prosody_it").tr("-", "_") }

  def cassandra_client(group, **options)
    kafka_client(topic, group:, cassandra_nodes: KafkaHelpers::CASSANDRA, cassandra_keyspace: keyspace,
                        **options)
  end

  # Proves that acknowledged timers survive a killed process: a new client fires every one, at
  # least once and never early.
  it "fires 1,000 timers over 100 keys after the process that scheduled them was killed" do
    group = unique("group")
    keys = 100
    per_key = 10
    base = Time.now.to_i + 30
    producer = raw_kafka_producer
    keys.times do |k|
      per_key.times { |i| producer.produce(topic, nil, "key-#{k}", JSON.generate("at" => base + i), {}) }
    end
    producer.flush(30)

    log = run_child_until_killed(
      "timer_child.rb",
      [KafkaHelpers::BOOTSTRAP, KafkaHelpers::CASSANDRA, keyspace, topic, group, keys * per_key], "DONE"
    )
    expect(log.grep(/FIRED-EARLY/)).to be_empty
    acknowledged = log.grep(/\Akey-/).map { |l| l.split.then { |k, t| [k, Integer(t)] } }.uniq
    expect(acknowledged.size).to eq(keys * per_key)
    expect(Time.now.to_i).to be < base, "the child must be killed before any timer is due"

    handler = FiredTimers.new
    subscribe_tracked(cassandra_client(group), handler)
    wait_for(timeout: 60, message: "every timer to fire") do
      handler.fired.map { |k, t, _| [k, t] }.uniq.size >= acknowledged.size
    end
    fired = handler.fired
    expect(fired.map { |k, t, _| [k, t] }.uniq.sort).to eq(acknowledged.sort)
    lateness = fired.map { |_, t, at| at - t }
    expect(lateness.min).to be >= 0, "a timer fired early"
    sorted = lateness.sort
    p50 = sorted[sorted.size / 2]
    p99 = sorted[(sorted.size * 0.99).floor]
    puts format("\n      timer lateness after restart: p50 %<p50>.3fs p99 %<p99>.3fs (%<n>d timers)",
                p50:, p99:, n: fired.size)
  end

  # Proves that timers survive a rebalance between clients: one leaves, the other fires them.
  it "loses no timer when one of two clients sharing the topic leaves" do
    group = unique("group")
    base = Time.now.to_i + 20
    scheduled = Queue.new
    scheduler = Class.new(FiredTimers) do
      define_method(:on_message) do |context, message|
        context.schedule(Time.at(message.payload["at"]))
        scheduled << message.key
      end
    end
    first = scheduler.new
    second = scheduler.new
    a = subscribe_tracked(cassandra_client(group), first)
    b = subscribe_tracked(cassandra_client(group), second)
    wait_for(timeout: 30, message: "both clients to get partitions") do
      a.assigned_partitions.positive? && b.assigned_partitions.positive?
    end
    producer = raw_kafka_producer
    40.times { |k| producer.produce(topic, nil, "key-#{k}", JSON.generate("at" => base), {}) }
    producer.flush(30)
    wait_for(timeout: 30, message: "the timers to be scheduled") { scheduled.size >= 40 }
    expect(Time.now.to_i).to be < base, "the first client must leave before the timers are due"
    a.unsubscribe
    wait_for(timeout: 60, message: "every timer to fire") { (first.fired + second.fired).map(&:first).uniq.size == 40 }
    expect((first.fired + second.fired).map(&:first).uniq.size).to eq(40)
  end
end

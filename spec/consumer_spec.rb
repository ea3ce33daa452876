# frozen_string_literal: true

RSpec.describe "consuming in mock mode" do
  let(:topic) { unique("topic") }

  it "round-trips every JSON type and headers, with the message's metadata" do
    handler = SpecHelpers::RecordingHandler.new
    client = start(handler)
    payloads = [{ "a" => { "b" => [1, -2, 3.5, "x", nil, true, false] } }, [1, "two"], "text", 42, 2**70, 1.25,
                true, false, nil, { "unicode" => "héllo ✓" },
                { "z" => 123_456_789_012_345_678_901_234_567_890, "m" => 2**64, "a" => -(2**70) }]
    payloads.each { |p| client.send_message(topic, "key", p, headers: { "trace" => "t-1", sym: "v" }) }
    wait_for(message: "all payloads") { handler.count == payloads.size }
    expect(handler.payloads).to eq(payloads)
    # Exactly as sent: integers of any size stay Integers (not Floats that compare equal), and
    # object keys keep their order, as JSON.parse gives them.
    expect(handler.payloads.map { |p| JSON.generate(p) }).to eq(payloads.map { |p| JSON.generate(p) })
    expect(handler.payloads.last.values).to all(be_an(Integer))
    message = handler.calls.first
    expect(message.topic).to eq(topic)
    expect(message.key).to eq("key")
    expect(message.partition).to be_between(0, 3)
    expect(message.offset).to eq(0)
    expect(message.timestamp).to be_a(Time).and be_within(60).of(Time.now)
    expect(message.headers).to eq("source-system" => "spec-producer", "trace" => "t-1", "sym" => "v")
    expect(message.payload).to equal(message.payload) # decoded once
  end

  it "runs one key's messages in order and one at a time while keys interleave (50 keys x 200)" do
    keys = 50
    per_key = 200
    active = Hash.new(0)
    overlaps = 0
    seen = Hash.new { |h, k| h[k] = [] }
    handler = SpecHelpers::RecordingHandler.new do |_context, message|
      key = message.key
      overlaps += 1 if (active[key] += 1) > 1
      Async::Task.current.yield # let other keys run in between
      seen[key] << message.payload["seq"]
      active[key] -= 1
    end
    producer = raw_producer
    Prosody::Native.mock_create_topic(topic, 4)
    per_key.times do |seq|
      keys.times { |k| producer.produce(topic, nil, "key-#{k}", JSON.generate("seq" => seq), {}) }
    end
    producer.flush(30)
    start(handler, max_concurrency: 16)
    wait_for(timeout: 60, message: "10k messages") { handler.count >= keys * per_key }
    expect(handler.count).to eq(keys * per_key)
    expect(overlaps).to eq(0)
    expect(seen.keys.size).to eq(keys)
    seen.each_value { |seqs| expect(seqs).to eq((0...per_key).to_a) }
  end

  it "runs different keys concurrently up to max_concurrency, and no further" do
    current = 0
    peak = 0
    handler = SpecHelpers::RecordingHandler.new do
      current += 1
      peak = [peak, current].max
      sleep 0.05 # yields to the reactor
      current -= 1
    end
    client = start(handler, max_concurrency: 8)
    40.times { |i| client.send_message(topic, "key-#{i}", i) }
    wait_for(message: "40 messages") { handler.count == 40 }
    expect(peak).to eq(8)
  end

  it "keeps the client running when handlers raise, including non-StandardError exceptions (best_effort)" do
    handler = SpecHelpers::RecordingHandler.new do |_context, message|
      case message.payload
      when "boom" then raise ArgumentError, "bad thing"
      when "not-implemented" then raise NotImplementedError, "missing"
      end
    end
    client = start(handler, mode: :best_effort)
    %w[boom not-implemented fine].each { |p| client.send_message(topic, "k", p) }
    client.send_message(topic, "other", "also fine")
    wait_for(message: "the later messages") do
      handler.payloads.include?("also fine") && handler.payloads.include?("fine")
    end
    logs = wait_for(message: "failure logs") { (l = log_output)[/NotImplementedError/] && l }
    expect(logs)
      .to match(/topic=#{topic} partition=\d offset=0 key="k" failed \(attempt 1, transient ArgumentError: bad thing/)
    expect(logs).to match(/offset=1 key="k" failed \(attempt 1, transient NotImplementedError: missing/)
    expect(client.consumer_state).to eq(:running)
  end

  it "builds payloads written by other producers as JSON.parse does, and skips text that is not JSON" do
    texts = [
      '{"b":1,"a":{"id":"inner"},"b":[2]}', # a repeated key keeps its first place and its last value
      '{"k\u00e9y":"\ud83d\ude00 \"q\" \\\\ \/ \n\t","id":"x","type":7}',
      " [ 1 , 2.50 , -0 , 1E2 , 1e-2 , -12345678901234567890123 ] ",
      "\"caf\u00e9\"",
      "{}", "[]", "0"
    ]
    bad = ['{"a":"\ud800"}', "{\"a\":\"\xFF\"}".b, '{"a":01}', '{"a":1} x']
    handler = SpecHelpers::RecordingHandler.new
    Prosody::Native.mock_create_topic(topic, 1)
    producer = raw_producer
    (bad + texts).each { |text| producer.produce(topic, 0, "k", text, {}) }
    producer.flush(10)
    start(handler)
    wait_for(message: "every JSON record") { handler.count == texts.size }
    expected = texts.map { |text| JSON.parse(text) }
    expect(handler.payloads).to eq(expected)
    expect(handler.payloads.map { |p| JSON.generate(p) }).to eq(expected.map { |p| JSON.generate(p) })
    expect(handler.payloads[2].map(&:class)).to eq([Integer, Float, Integer, Float, Float, Integer])
    bad.each_index do |offset|
      expect(wait_for { log_output[/skipping undecodable record topic=#{topic} partition=0 offset=#{offset}\b/] })
        .to be_truthy
    end
  end

  it "delivers records without a key, and logs and skips records whose payload is not JSON" do
    handler = SpecHelpers::RecordingHandler.new
    Prosody::Native.mock_create_topic(topic, 1)
    producer = raw_producer
    producer.produce(topic, 0, nil, JSON.generate("no" => "key"), {})
    producer.produce(topic, 0, "k", "{not json", {})
    producer.produce(topic, 0, "k", JSON.generate("after" => "bad"), {})
    producer.produce(topic, 0, "k", nil, {})
    producer.flush(10)
    start(handler)
    wait_for(message: "three good records") { handler.count == 3 }
    expect(handler.calls.map(&:key)).to contain_exactly(nil, "k", "k")
    expect(handler.payloads).to contain_exactly({ "no" => "key" }, { "after" => "bad" }, nil)
    expect(wait_for { log_output[/skipping undecodable record topic=#{topic} partition=0 offset=1/] }).to be_truthy
  end

  it "skips records this group produced itself (source-system equals group_id)" do
    group = unique("group")
    handler = SpecHelpers::RecordingHandler.new
    client = Prosody::Client.new(mock: true, group_id: group, subscribed_topics: topic, send_timeout: 10)
    subscribe_tracked(client, handler)
    client.send_message(topic, "k", "own") # source-system = group_id
    other = Prosody::Client.new(mock: true, source_system: "someone-else", send_timeout: 10)
    other.send_message(topic, "k", "foreign")
    wait_for(message: "the foreign record") { handler.count == 1 }
    expect(handler.payloads).to eq(["foreign"])
  end

  it "lets in-flight handlers finish on unsubscribe and commits, so a new client resumes after them" do
    group = unique("group")
    started = Queue.new
    handler = SpecHelpers::RecordingHandler.new do
      started << true
      sleep 0.3
    end
    client = mock_client(topic, group:)
    client.subscribe(handler)
    5.times { |i| client.send_message(topic, "key-#{i}", i) }
    5.times { started.pop }
    client.unsubscribe
    expect(handler.count).to eq(5)
    expect(client.consumer_state).to eq(:configured)

    client.send_message(topic, "key-0", "later")
    second = SpecHelpers::RecordingHandler.new
    start(second, group:)
    wait_for(message: "the later message") { second.count == 1 }
    expect(second.payloads).to eq(["later"])
  end

  it "cancels handlers that outlive shutdown_timeout: should_cancel? turns true and Async::Stop arrives" do
    observed = Queue.new
    handler = SpecHelpers::RecordingHandler.new do |context|
      observed << :started
      begin
        sleep 10
      rescue Async::Stop
        observed << [:stopped, context.should_cancel?]
        raise
      end
    end
    client = mock_client(topic, shutdown_timeout: 0.5)
    client.subscribe(handler)
    client.send_message(topic, "k", 1)
    expect(observed.pop).to eq(:started)
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    client.unsubscribe
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 3
    expect(observed.pop).to eq([:stopped, true])
  end

  it "shares partitions between two clients of one group without losing or overlapping a key" do
    group = unique("group")
    keys = 40
    per_key = 50
    log = SpecHelpers::KeyLog.new
    make_handler = lambda do
      SpecHelpers::RecordingHandler.new do |_context, message|
        log.start(message.key)
        sleep 0.001
        log.finish(message.key, message.payload["seq"])
      end
    end
    first = make_handler.call
    second = make_handler.call
    a = start(first, group:)
    wait_for(message: "first assignment") { a.assigned_partitions == 4 }
    producer = raw_producer
    half = per_key / 2
    half.times { |seq| keys.times { |k| producer.produce(topic, nil, "key-#{k}", JSON.generate("seq" => seq), {}) } }
    producer.flush(10)
    b = start(second, group:)
    wait_for(message: "partitions to spread") { a.assigned_partitions.positive? && b.assigned_partitions.positive? }
    (half...per_key).each do |seq|
      keys.times do |k|
        producer.produce(topic, nil, "key-#{k}", JSON.generate("seq" => seq), {})
      end
    end
    producer.flush(10)
    wait_for(timeout: 60, message: "every message") { log.seen == keys * per_key }
    expect(a.assigned_partitions + b.assigned_partitions).to eq(4)
    expect(log.overlaps).to be_empty
    expect(second.count).to be_positive
    log.order.each_value do |seqs|
      # At-least-once: a re-delivery after the move may repeat a tail, but never reorders or skips.
      expect(seqs.uniq).to eq((0...per_key).to_a)
      # Each step is the next message, or a jump back to where a re-delivery starts.
      bad_steps = seqs.each_cons(2).reject { |x, y| y == x + 1 || y <= x }
      expect(bad_steps).to be_empty
    end
  end

  it "leaks no threads over 50 subscribe/unsubscribe cycles" do
    client = mock_client(topic)
    cycle = lambda do
      client.subscribe(SpecHelpers::RecordingHandler.new)
      client.unsubscribe
    end
    cycle.call # starts what is shared for the process (runtime, log thread)
    # Native threads by name, without the engine runtime's (its workers are fixed, and its
    # blocking pool starts threads on demand and ends them after 10 s idle, whatever ran before).
    native = lambda do
      Dir.children("/proc/self/task").filter_map do |task|
        name = File.read("/proc/self/task/#{task}/comm").strip
        name unless name == "prosody-worker"
      rescue SystemCallError
        nil # ended while being read
      end.tally
    end
    ruby_threads = Thread.list.size
    native_threads = native.call
    50.times { cycle.call }
    expect(Thread.list.size).to eq(ruby_threads)
    expect(prosody_threads).to be_empty
    # A thread just joined can linger in /proc for a moment; a leak would add one or more per
    # cycle (50+).
    grown = native.call.to_h { |name, count| [name, count - native_threads.fetch(name, 0)] }
    grown.select! { |_, count| count.positive? }
    expect(grown.sum { |_, count| count }).to be <= 2, "threads added over 50 cycles: #{grown.inspect}"
  end

  it "delivers engine log lines to the logger assigned at any time" do
    io = StringIO.new
    Prosody.logger = Logger.new(io, level: Logger::INFO)
    client = start(SpecHelpers::RecordingHandler.new)
    wait_for(message: "assignment logs") do
      Prosody.flush_logs || io.string[%r{assigned 4 partition\(s\): #{topic}/0, #{topic}/1}]
    end
    client.unsubscribe
    expect(wait_for { Prosody.flush_logs || io.string[/consumer stopped/] }).to be_truthy
    Prosody.logger = nil
    expect(Prosody.logger.level).to eq(Logger::INFO)
  end
end

# frozen_string_literal: true

# Producing without stalls: a send waits on its own fiber (a handler's, or the application's
# own Async block), a batch is sent at once and waited for once, tombstones and partitions.
RSpec.describe "Producing" do
  let(:topic) { unique("produce") }
  let(:out_topic) { unique("produce-out") }

  def monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  # A client whose sends wait for a broker that never answers, for +send_timeout+ seconds.
  def unreachable(send_timeout)
    # Producers are shared per process by servers and send_timeout: an address of its own.
    Prosody::Client.new(bootstrap_servers: "127.0.0.1:1", send_timeout:)
  end

  # Subscribes a recorder to +out_topic+.
  def record_out_topic
    recorder = SpecHelpers::RecordingHandler.new
    subscribe_tracked(mock_client(out_topic), recorder)
    recorder
  end

  it "a handler waiting for an acknowledgement lets the other keys' handlers run meanwhile" do
    stuck = unreachable(3)
    started = Queue.new
    send_failed_at = Queue.new
    handler = SpecHelpers::RecordingHandler.new do |_c, m|
      next unless m.key == "stuck"

      started << true
      begin
        stuck.send_message("nowhere", "x", 1)
      rescue Prosody::SendError => e
        send_failed_at << [monotonic, e]
      end
    end
    client = start(handler)
    client.send_message(topic, "stuck", "first")
    Timeout.timeout(20) { started.pop }
    sent_at = monotonic
    20.times { |i| client.send_message(topic, "k#{i}", i) }
    # (The stuck handler's call is recorded when it returns.)
    wait_for(message: "the other keys' messages") { handler.count == 20 }
    others_done = monotonic - sent_at

    # All 20 were handled while the stuck send was still waiting, and quickly.
    expect(send_failed_at).to be_empty
    expect(others_done).to be < 1.5
    failed_at, error = Timeout.timeout(20) { send_failed_at.pop }
    expect(error.message).to match(/could not send to topic "nowhere" \(key "x"\).*send_timeout/)
    expect(failed_at - sent_at).to be > others_done
  end

  it "sends from one fiber arrive in the order sent" do
    recorder = record_out_topic
    handler = SpecHelpers::RecordingHandler.new do |_c, m|
      client_for(out_topic).then { |c| 50.times { |i| c.send_message(out_topic, "seq", i) } } if m.payload == "go"
    end
    client = start(handler)
    client.send_message(topic, "k", "go")
    wait_for(message: "50 records") { recorder.count == 50 }
    expect(recorder.payloads).to eq((0...50).to_a)
  end

  it "a send from the application's own Async block waits on its fiber only" do
    stuck = unreachable(0.5)
    ticks = 0
    started = monotonic
    Async do |task|
      ticker = task.async do
        loop do
          sleep 0.01
          ticks += 1
        end
      end
      expect { stuck.send_message("nowhere", "x", 1) }.to raise_error(Prosody::SendError, /"nowhere"/)
      ticker.stop
    end
    elapsed = monotonic - started
    expect(elapsed).to be >= 0.5
    # The ticker kept running the whole time (at least half the ticks that fit).
    expect(ticks).to be >= (elapsed / 0.01 / 2).floor
  end

  it "send_messages delivers every good record and raises listing the one that failed" do
    recorder = record_out_topic
    records = [
      { topic: out_topic, key: "a", payload: { "n" => 0 } },
      { topic: out_topic, key: "b", payload: 1, partition: 1000 },
      { topic: out_topic, key: "c", tombstone: true, partition: 2 },
      { topic: out_topic, key: "d", payload: nil, headers: { "h" => "v" } }
    ]
    expect { mock_client(topic).send_messages(records) }.to raise_error(Prosody::SendError) { |e|
      expect(e.message).to match(/1 of 4 records were not delivered.*\n  record 1 \(topic "#{out_topic}", key "b"\): /)
      expect(e.message).to match(/Unknown partition/)
      expect(e.failures).to match([a_hash_including(index: 1, topic: out_topic, key: "b", reason: /Unknown partition/)])
    }
    wait_for(message: "the three good records") { recorder.count == 3 }
    by_key = recorder.calls.to_h { |m| [m.key, m] }
    expect(by_key.keys).to contain_exactly("a", "c", "d")
    expect([by_key["a"].payload, by_key["a"].tombstone?]).to eq([{ "n" => 0 }, false])
    expect([by_key["c"].payload, by_key["c"].tombstone?, by_key["c"].partition]).to eq([nil, true, 2])
    expect([by_key["d"].payload, by_key["d"].tombstone?, by_key["d"].headers["h"]]).to eq([nil, false, "v"])
  end

  it "send_messages returns nil once all are acknowledged, inside a handler too" do
    recorder = record_out_topic
    result = Queue.new
    handler = SpecHelpers::RecordingHandler.new do |_c, m|
      batch = Array.new(100) { |i| { topic: out_topic, key: "k#{i % 7}", payload: i } }
      result << client_for(out_topic).send_messages(batch) if m.payload == "go"
    end
    start(handler).send_message(topic, "k", "go")
    expect(Timeout.timeout(20) { result.pop }).to be_nil
    wait_for(message: "100 records") { recorder.count == 100 }
    expect(recorder.payloads.sort).to eq((0...100).to_a)
  end

  it "a bad record is an ArgumentError naming its index, and nothing of the batch is sent" do
    recorder = record_out_topic
    client = mock_client(topic)
    bad = [
      [{ topic: out_topic, key: "k", payload: "first" }, { topic: out_topic, key: "k" }, /record 1: missing :payload/],
      [{ topic: out_topic, key: "k", payload: "first" }, { topic: out_topic, key: "k", payload: 1, tombstone: true },
       /record 1: a tombstone has no payload/],
      [{ topic: out_topic, key: "k", payload: "first" }, { topic: out_topic, key: "k", payload: Object.new },
       /record 1: payload is a Object/],
      [{ topic: out_topic, key: "k", payload: "first" }, { topic: out_topic, key: "k", payload: 1, partition: -1 },
       /record 1: partition must be nil or an Integer/],
      [{ topic: out_topic, key: "k", payload: "first" }, { topic: out_topic, key: "k", payload: 1, color: 1 },
       /record 1: unknown key\(s\) :color/],
      [{ topic: out_topic, key: "k", payload: "first" }, "not a hash", /record 1: expected a Hash/]
    ]
    bad.each do |good, wrong, message|
      expect { client.send_messages([good.merge(partition: 0), wrong]) }.to raise_error(ArgumentError, message)
    end
    expect { client.send_messages("x") }.to raise_error(ArgumentError, /records must be an Array/)
    # A marker on the same partition arrives; nothing from the refused batches came before it.
    client.send_message(out_topic, "k", "marker", partition: 0)
    wait_for(message: "the marker") { recorder.count == 1 }
    expect(recorder.payloads).to eq(["marker"])
  end

  it "send_tombstone and an explicit partition" do
    recorder = record_out_topic
    client = mock_client(topic)
    client.send_tombstone(out_topic, "gone", partition: 3)
    client.send_message(out_topic, "here", nil, partition: 1)
    wait_for(message: "both records") { recorder.count == 2 }
    gone, here = recorder.calls.sort_by(&:key)
    expect([gone.key, gone.tombstone?, gone.payload, gone.partition]).to eq(["gone", true, nil, 3])
    expect([here.key, here.tombstone?, here.payload, here.partition]).to eq(["here", false, nil, 1])
    expect { client.send_message(out_topic, "k", 1, partition: "1") }
      .to raise_error(ArgumentError, /partition must be nil or an Integer from 0 to 2147483647, got "1"/)
  end

  it "send_messages encodes every JSON value as send_message does" do
    recorder = record_out_topic
    payloads = [
      { "text" => "tab\t quote\" backslash\\ newline\n ctrl\u0001\u001f del\u007f é 日本 🎉 </script>" },
      { sym: :value, "nested" => [1, -2, 2**62, 1.0, -0.0, 1.5e-7, 1e20, 1e-300, 0.1, true, false, nil] },
      { "big" => [2**64, -(2**70)] },
      [[[[]]], {}, "", "binary ascii".b],
      "a string", 42, 3.25, nil, true,
      (1..99).reduce([]) { |inner, _| [inner] } # 100 levels deep, as deep as JSON.generate goes
    ]
    records = payloads.each_with_index.map do |payload, i|
      { topic: out_topic, key: "k", payload:, partition: 0, headers: { "i" => i.to_s } }
    end
    mock_client(topic).send_messages(records)
    wait_for(message: "every record") { recorder.count == payloads.size }
    received = recorder.calls.sort_by(&:offset).map(&:payload)
    expect(received).to eq(payloads.map { |p| JSON.parse(JSON.generate(p)) })
  end

  it "send_messages refuses what send_message refuses, naming the record" do
    client = mock_client(topic)
    bad = {
      { "a" => Float::NAN } => /record 0: payload\["a"\] is NaN, which JSON cannot represent/,
      { "a" => "\xff".b } => /record 0: payload cannot be encoded as JSON/,
      { 1 => 2 } => /record 0: payload has the key 1/,
      (1..100).reduce([]) do |inner, _|
        [inner]
      end => /record 0: payload cannot be encoded as JSON: nesting of \d+ is too deep/
    }
    bad.each do |payload, message|
      expect { client.send_messages([{ topic: out_topic, key: "k", payload: }]) }.to raise_error(ArgumentError, message)
      expect { client.send_message(out_topic, "k", payload) }.to raise_error(ArgumentError)
    end
  end

  it "32 handlers sending at once all get their acknowledgements (no result is lost)" do
    # Results of many sends arrive while the processor collects earlier ones: a lost wake-up
    # would leave handlers waiting forever (a build that coalesced the bridge's wake-ups wrongly
    # hung here).
    recorder = record_out_topic
    sender = mock_client(out_topic)
    handler = SpecHelpers::RecordingHandler.new { |_c, m| sender.send_message(out_topic, m.key, m.payload) }
    client = start(handler, max_concurrency: 32)
    count = 20_000
    client.send_messages(Array.new(count) { |i| { topic:, key: "k#{i % 1000}", payload: i } })
    wait_for(timeout: 60, message: "#{count} handlers and their sends") { handler.count == count }
    wait_for(message: "#{count} records") { recorder.count == count }
    expect(recorder.payloads.sort).to eq((0...count).to_a)
  end
end

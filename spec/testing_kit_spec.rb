# frozen_string_literal: true

require "prosody/testing"

# The testing kit (require "prosody/testing") through the public API, on the mock cluster.
RSpec.describe Prosody::Testing do
  let(:topic) { unique("kit-in") }
  let(:out) { unique("kit-out") }

  # Forwards each message to +out+ (with a header), and schedules a reminder when asked.
  let(:handler_class) do
    Class.new(Prosody::EventHandler) do
      attr_reader :fired, :handled

      def initialize(client, out)
        super()
        @client = client
        @out = out
        @fired = []
        @handled = []
      end

      def on_message(context, message)
        @handled << message.payload
        context.schedule(Time.now + message.payload["remind_in"]) if message.payload["remind_in"]
        @client.send_message(@out, message.key, message.payload, headers: { "via" => "kit\xFF".b })
      end

      def on_timer(_context, timer)
        @fired << timer.key
      end
    end
  end

  def start_forwarding
    client = mock_client(topic, mock_partitions: 2)
    handler = handler_class.new(client, out)
    subscribe_tracked(client, handler)
    [client, handler]
  end

  it "reads what was produced to a topic, waiting for a count, with keys, payloads and headers as sent" do
    client, = start_forwarding
    expect(described_class.records(out)).to eq([])
    3.times { |i| client.send_message(topic, "k#{i}", { "n" => i, "big" => 2**70 }) }
    records = described_class.wait_for_records(out, 3)
    expect(records.size).to eq(3)
    expect(records.map(&:key)).to match_array(%w[k0 k1 k2])
    expect(records.map { |r| r.payload["n"] }).to match_array([0, 1, 2])
    expect(records.first.payload["big"]).to eq(2**70)
    expect(records.first.headers["via"]).to eq("kit\xFF".b)
    expect(records.first.topic).to eq(out)
    expect { described_class.wait_for_records(out, 4, timeout: 0.2) }
      .to raise_error(Prosody::Testing::TimeoutError, /4 records on "#{out}" \(found 3\)/)
  end

  it "waits until a client handled everything sent so far, without sleeping in the spec" do
    client, handler = start_forwarding
    50.times { |i| client.send_message(topic, "k#{i % 7}", { "n" => i }) }
    described_class.wait_until_handled(client)
    expect(handler.handled.size).to eq(50)
  end

  it "fires a timer two hours ahead in milliseconds when the clock moves, and provably not before" do
    client, handler = start_forwarding
    client.send_message(topic, "reminder", { "remind_in" => 7200 })
    described_class.wait_until_handled(client)
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    described_class.advance_timers(client, 7100)
    expect(handler.fired).to eq([])
    described_class.advance_timers(client, 101)
    expect(handler.fired).to eq(["reminder"])
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 5
    expect { described_class.advance_timers(client, -1) }.to raise_error(ArgumentError, /forward/)
  end

  it "resets the mock cluster for the clients created after it, leaving older clients on theirs" do
    shared = unique("kit-shared")
    before = mock_client(shared)
    before.send_message(shared, "k", { "era" => "before" })
    expect(described_class.records(shared).map(&:payload)).to eq([{ "era" => "before" }])
    described_class.reset_mock!
    expect(described_class.records(shared)).to eq([])
    after = mock_client(shared)
    after.send_message(shared, "k", { "era" => "after" })
    expect(described_class.records(shared).map(&:payload)).to eq([{ "era" => "after" }])
    before.send_message(shared, "k", { "era" => "still the old cluster" })
    expect(described_class.records(shared).map(&:payload)).to eq([{ "era" => "after" }])
  end

  it "builds messages with the field types of consumed ones, for unit tests of a handler" do
    at = Time.at(1_796_000_000, 123, :millisecond)
    message = described_class.build_message(topic: "orders", key: "c-7", payload: { "id" => 2**70, "ok" => true },
                                            headers: { "h" => "\x00\xFF".b }, partition: 3, offset: 41, timestamp: at)
    expect(message).to be_a(Prosody::Message)
    expect([message.topic, message.partition, message.offset, message.key]).to eq(["orders", 3, 41, "c-7"])
    expect(message.payload).to eq({ "id" => 2**70, "ok" => true })
    expect(message.headers).to eq({ "h" => "\x00\xFF".b })
    expect(message.timestamp).to eq(at)
    expect(described_class.build_message(tombstone: true)).to be_tombstone
    expect { described_class.build_message(colour: "red") }.to raise_error(ArgumentError, /colour/)
  end

  it "records what a handler asks of its context and sends, with the real context's rules" do
    producer = Prosody::Testing::RecordingProducer.new
    handler = handler_class.new(producer, "unit-out")
    context = Prosody::Testing::RecordingContext.new
    now = Time.now
    handler.on_message(context, described_class.build_message(key: "u", payload: { "remind_in" => 60 }))
    expect(context.calls.map(&:first)).to eq([:schedule])
    expect(context.scheduled).to eq([Time.at((now + 60).to_r.ceil)]).or eq([Time.at((now + 61).to_r.ceil)])
    context.unschedule(context.scheduled.first)
    expect(context.scheduled).to eq([])
    expect { context.schedule(Time.utc(10_000)) }.to raise_error(ArgumentError, /outside the supported range/)
    expect(producer.sent.map { |s| [s.topic, s.key, s.payload, s.headers] })
      .to eq([["unit-out", "u", { "remind_in" => 60 }, { "via" => "kit\xFF".b }]])
    expect(context.should_cancel?).to be(false)
    expect { context.on_cancel }.to raise_error(Prosody::Error, /cancel!/)
    context.cancel!
    expect(context.should_cancel?).to be(true)
  end
end

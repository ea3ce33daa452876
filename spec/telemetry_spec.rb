# frozen_string_literal: true

require "json"
require "prosody/testing"

# The telemetry emitter in mock mode: off unless asked for, and when asked for, one JSON record
# per lifecycle event on telemetry_topic, keyed by the event's key (the README's schema).
RSpec.describe "telemetry events (mock)" do
  let(:topic) { unique("telemetry-in") }
  let(:telemetry_topic) { unique("telemetry-events") }
  let(:group) { unique("group") }
  let(:parent) { "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" }

  def start(handler, **options)
    super(handler, group:, telemetry_enabled: true, telemetry_topic:, mock_partitions: 1,
                   retry_base: 0.005, max_retry_delay: 0.05, **options)
  end

  # Every telemetry record, once at least +count+ arrived, as [key, event Hash] pairs.
  def events(count)
    Prosody::Testing.wait_for_records(telemetry_topic, count, timeout: 20).map { |r| [r.key, r.payload] }
  end

  def named(events, name)
    events.select { |_, e| e["event"] == name }
  end

  it "is off in mock mode unless telemetry_enabled is given" do
    client = mock_client(topic)
    expect(client.telemetry_stats).to be_nil
    expect(mock_client(topic, telemetry_enabled: true, telemetry_topic:).telemetry_stats).to eq(emitted: 0, dropped: 0)
  end

  it "reports a message received, handled, sent and a timer's life, with the trace id" do
    handler = Class.new(Prosody::EventHandler) do
      define_method(:on_message) { |context, _message| context.schedule(Time.now) }
      define_method(:on_timer) { |_context, _timer| nil }
    end
    client = start(handler.new)
    client.send_message(topic, "order-1", { "id" => 1 }, headers: { "traceparent" => parent })
    all = events(6)
    sent, = named(all, "message.sent")
    received, = named(all, "message.received")
    succeeded, = named(all, "message.succeeded")
    expect(sent).to eq(["order-1", sent[1]])
    expect(sent[1]).to include("topic" => topic, "partition" => 0, "offset" => 0, "key" => "order-1",
                               "trace_id" => "0af7651916cd43dd8448eb211c80319c")
    expect(received[0]).to eq("order-1")
    expect(received[1]).to include("group" => group, "topic" => topic, "partition" => 0, "offset" => 0,
                                   "key" => "order-1", "trace_id" => "0af7651916cd43dd8448eb211c80319c")
    expect(received[1]["timestamp_ms"]).to be_within(60_000).of((Time.now.to_f * 1000).to_i)
    expect(received[1]).to have_key("message_timestamp_ms")
    expect(succeeded[1]).to include("offset" => 0, "key" => "order-1")
    %w[timer.scheduled timer.fired timer.succeeded].each do |name|
      event = named(all, name).first
      expect(event).not_to be_nil, "no #{name} in #{all.map { |_, e| e['event'] }}"
      expect(event[1]).to include("key" => "order-1", "topic" => topic, "timer_time" => Integer)
      expect(event[1]).not_to have_key("offset")
    end
    expect(client.telemetry_stats).to include(dropped: 0)
  end

  it "reports failures, retries, dead letters, duplicates and filtered messages" do
    dlq = unique("telemetry-dlq")
    handler = Class.new(Prosody::EventHandler) do
      permanent :on_message, ArgumentError
      define_method(:on_message) do |_context, message|
        raise ArgumentError, "bad order" if message.key == "bad"
        raise IOError, "flaky" if message.key == "flaky" && (@flaky = (@flaky || 0) + 1) == 1
      end
    end
    client = start(handler.new, mode: :low_latency, failure_topic: dlq, allowed_events: ["order."])
    client.send_message(topic, "flaky", { "type" => "order.created" })
    client.send_message(topic, "bad", { "type" => "order.created" })
    client.send_message(topic, "dup", { "id" => "x", "type" => "order.created" })
    client.send_message(topic, "dup", { "id" => "x", "type" => "order.created" })
    client.send_message(topic, "other", { "type" => "user.created" })
    # 5 sent, 5 received; flaky: failed, retried, succeeded; bad: failed, dead-lettered; dup:
    # succeeded, deduplicated; other: filtered.
    all = events(18)
    failed = named(all, "message.failed").to_h
    expect(failed["flaky"]).to include("error_class" => "IOError", "permanent" => false, "attempt" => 1)
    expect(failed["bad"]).to include("error_class" => "ArgumentError", "permanent" => true, "attempt" => 1)
    expect(named(all, "message.retried").to_h["flaky"]).to include("attempt" => 1, "delay_ms" => Integer)
    expect(named(all, "message.dead_lettered").to_h["bad"]).to include("failure_topic" => dlq,
                                                                       "reason" => "permanent")
    expect(named(all, "message.deduplicated").map(&:first)).to eq(["dup"])
    expect(named(all, "message.filtered").map(&:first)).to eq(["other"])
    expect(named(all, "message.succeeded").map(&:first)).to contain_exactly("flaky", "dup")
  end

  it "reports timers unscheduled and cleared, and a failing timer" do
    handler = Class.new(Prosody::EventHandler) do
      define_method(:on_message) do |context, _message|
        later = Time.now + 3600
        context.schedule(later)
        context.unschedule(later)
        context.schedule(later)
        context.clear_scheduled
        context.schedule(Time.now)
      end
      define_method(:on_timer) { |_context, _timer| raise IOError, "reminder service down" }
    end
    client = start(handler.new, max_retries: 0, mode: :best_effort)
    client.send_message(topic, "k", { "n" => 1 })
    all = events(10)
    unscheduled = named(all, "timer.unscheduled").map { |_, e| e["timer_time"] }
    expect(unscheduled.size).to eq(2)
    expect(unscheduled.first).to be_an(Integer)
    expect(unscheduled.last).to be_nil
    expect(named(all, "timer.scheduled").size).to eq(3)
    failed = named(all, "timer.failed").first
    expect(failed[1]).to include("key" => "k", "error_class" => "IOError", "permanent" => false, "attempt" => 1,
                                 "timer_time" => Integer)
  end

  it "reports a deferred key in pipeline mode" do
    handler = SwitchHandler.new(["k"])
    client = start(handler, defer_base: 0.05, defer_max_delay: 0.2, max_retries: 0)
    client.send_message(topic, "k", { "n" => 1 })
    wait_for(message: "the deferral") do
      Prosody::Testing.records(telemetry_topic).any? { |r| r.payload["event"] == "message.deferred" }
    end
    handler.failing.clear
    deferred = events(4).find { |_, e| e["event"] == "message.deferred" }
    expect(deferred[1]).to include("key" => "k", "offset" => 0, "topic" => topic)
  end
end

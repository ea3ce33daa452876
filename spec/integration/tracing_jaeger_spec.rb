# frozen_string_literal: true

require "json"
require "open3"
require "net/http"
require "rbconfig"

# Spans exported to a real Jaeger (dev/services starts it on 127.0.0.1) from a child process on
# the real Kafka and Cassandra (spec/integration/tracing_child.rb): produce -> consume -> produce
# -> consume, a timer, and a dead letter, read back from Jaeger's query API.
module JaegerHelpers
  QUERY = ENV.fetch("PROSODY_TEST_JAEGER", "127.0.0.1:16686")
  OTLP_HTTP = "http://127.0.0.1:4318"
  OTLP_GRPC = "http://127.0.0.1:4317"

  # A span of Jaeger's answer as a Hash: operation, ids, references, tags, event names, and its
  # process's service name and resource tags.
  def self.span(data, span)
    process = data["processes"][span["processID"]]
    { name: span["operationName"], id: span["spanID"], trace: span["traceID"],
      refs: span["references"].map { |r| [r["refType"], r["traceID"], r["spanID"]] },
      tags: span["tags"].to_h { |t| [t["key"], t["value"]] },
      events: span["logs"].map { |l| l["fields"].find { |f| f["key"] == "event" }&.dig("value") },
      service: process["serviceName"], resource: process["tags"].to_h { |t| [t["key"], t["value"]] } }
  end
end

RSpec.describe "tracing to Jaeger", :kafka, :cassandra do
  before(:context) { KafkaHelpers.ensure_service!("jaeger", "Jaeger", JaegerHelpers::QUERY) }

  let(:service) { unique("prosody-spec") }
  let(:topic_in) { create_topic(unique("trace-in"), partitions: 1) }
  let(:topic_out) { create_topic(unique("trace-out"), partitions: 1) }
  let(:dlq) { create_topic(unique("trace-dlq"), partitions: 1) }
  let(:keyspace) { unique("prosody_trace").tr("-", "_") }
  let(:telemetry_topic) { create_topic(unique("trace-telemetry"), partitions: 1) }

  # Runs the child scenario with +env+ and returns its handler calls' trace contexts.
  def run_child(scenario, env)
    out = File.join(Dir.tmpdir, "#{unique('tracing-child')}.json")
    log = "#{out}.log"
    script = File.expand_path("tracing_child.rb", __dir__)
    env = { "OTEL_SERVICE_NAME" => service, "OTEL_RESOURCE_ATTRIBUTES" => "deployment.environment=spec",
            "PROSODY_TELEMETRY_TOPIC" => telemetry_topic }.merge(env)
    pid = Process.spawn(env, RbConfig.ruby, script, scenario, KafkaHelpers::BOOTSTRAP, KafkaHelpers::CASSANDRA,
                        keyspace, topic_in, topic_out, dlq, out, %i[out err] => log)
    _, status = Process.wait2(pid)
    expect(status).to be_success, File.read(log)
    JSON.parse(File.read(out))
  end

  def jaeger(path)
    response = Net::HTTP.get_response(URI("http://#{JaegerHelpers::QUERY}#{path}"))
    response.is_a?(Net::HTTPOK) ? JSON.parse(response.body) : nil
  end

  # The spans of trace +id+ (see JaegerHelpers.span) once it has at least +count+ of them.
  def trace(id, count)
    wait_for(timeout: 30, message: "#{count} spans of trace #{id} in Jaeger") do
      data = jaeger("/api/traces/#{id}")&.dig("data", 0)
      data["spans"].map { |span| JaegerHelpers.span(data, span) } if data && data["spans"].size >= count
    end
  end

  def ids(context)
    _, trace_id, span_id, = context.fetch("traceparent").split("-")
    [trace_id, span_id]
  end

  def one(spans, name, **tags)
    found = spans.select { |s| s[:name] == name && tags.all? { |k, v| s[:tags][k.to_s] == v } }
    expect(found.size).to eq(1), "expected one #{name} span with #{tags}, got #{spans.map { |s| s[:name] }}"
    found.first
  end

  def child_of(span, parent)
    expect(span[:refs]).to eq([["CHILD_OF", parent[:trace], parent[:id]]])
  end

  it "records the chain, the timer's link and the dead letter with their attributes (http/protobuf, the default)" do
    calls = run_child("full", "OTEL_EXPORTER_OTLP_ENDPOINT" => JaegerHelpers::OTLP_HTTP)
    trace_id, handler_a = ids(calls.fetch("a:order-1"))
    spans = trace(trace_id, 5)

    sent = one(spans, "send #{topic_in}")
    expect(sent[:refs]).to eq([])
    expect(sent[:tags]).to include("span.kind" => "producer", "messaging.system" => "kafka",
                                   "messaging.operation.type" => "send", "messaging.destination.name" => topic_in,
                                   "messaging.kafka.message.key" => "order-1",
                                   "messaging.destination.partition.id" => "0", "messaging.kafka.offset" => 0)
    process_a = one(spans, "process #{topic_in}")
    child_of(process_a, sent)
    expect(process_a[:tags]).to include("span.kind" => "consumer", "messaging.consumer.group.name" => "#{topic_in}-a",
                                        "messaging.destination.partition.id" => "0", "messaging.kafka.offset" => 0,
                                        "messaging.kafka.message.key" => "order-1", "prosody.outcome" => "success",
                                        "prosody.attempt" => 1)
    # The handler ran in the message's span: context.trace_context names it.
    expect(handler_a).to eq(process_a[:id])

    relayed = one(spans, "send #{topic_out}")
    child_of(relayed, process_a)
    process_b = one(spans, "process #{topic_out}")
    child_of(process_b, relayed)
    expect(process_b[:tags]).to include("messaging.consumer.group.name" => "#{topic_in}-b")
    expect(ids(calls.fetch("b:order-1"))[1]).to eq(process_b[:id])

    scheduled = one(spans, "schedule timer")
    child_of(scheduled, process_a)
    expect(sent).to include(service:)
    expect(sent[:resource]).to include("deployment.environment" => "spec")

    # The timer's handler runs in a new trace linked to the span that scheduled it (timer_spans
    # follows_from, the default), through the context stored in Cassandra.
    timer_trace, timer_handler = ids(calls.fetch("a:timer:order-1"))
    expect(timer_trace).not_to eq(trace_id)
    fired = one(trace(timer_trace, 1), "fire timer")
    expect(fired[:refs]).to eq([["FOLLOWS_FROM", trace_id, scheduled[:id]]])
    expect(fired[:tags]).to include("messaging.kafka.message.key" => "order-1", "prosody.outcome" => "success")
    expect(timer_handler).to eq(fired[:id])

    # The dead letter: the failure and the dead letter on the message's span, and the
    # dead-letter record sent (and consumed) inside the failed message's trace.
    poison_trace, = ids(calls.fetch("a:poison"))
    poison = trace(poison_trace, 4)
    poison_process = one(poison, "process #{topic_in}")
    expect(poison_process[:events]).to eq(["handler failure", "dead letter"])
    expect(poison_process[:tags]).to include("prosody.outcome" => "dead_lettered", "error.type" => "ArgumentError",
                                             "otel.status_code" => "ERROR")
    dead_letter = one(poison, "send #{dlq}")
    child_of(dead_letter, poison_process)
    child_of(one(poison, "process #{dlq}"), dead_letter)

    # Telemetry is on by default on a real cluster: the events name the same traces.
    events = telemetry(13)
    group_a = "#{topic_in}-a"
    expect(events).to include(include("event" => "message.received", "group" => group_a, "key" => "order-1",
                                      "topic" => topic_in, "partition" => 0, "offset" => 0, "trace_id" => trace_id),
                              include("event" => "message.succeeded", "group" => group_a, "key" => "order-1",
                                      "trace_id" => trace_id),
                              include("event" => "message.sent", "topic" => topic_out, "key" => "order-1",
                                      "trace_id" => trace_id),
                              include("event" => "timer.scheduled", "key" => "order-1", "trace_id" => trace_id),
                              include("event" => "timer.fired", "key" => "order-1", "trace_id" => timer_trace),
                              include("event" => "message.failed", "key" => "poison", "error_class" => "ArgumentError",
                                      "permanent" => true, "trace_id" => poison_trace),
                              include("event" => "message.dead_lettered", "key" => "poison", "failure_topic" => dlq))
  end

  # The telemetry records on the real broker (all of them, once at least +count+ arrived), parsed.
  def telemetry(count)
    records = []
    wait_for(timeout: 30, message: "#{count} telemetry records") do
      records = Prosody::Native.read_topic(KafkaHelpers::BOOTSTRAP, telemetry_topic, 100, 2.0)
      records.size >= count
    end
    records.map { |r| JSON.parse(r["payload"]) }
  end

  it "links a message's trace to the producer's and continues the scheduling trace in the timer, when told" do
    calls = run_child("full", "OTEL_EXPORTER_OTLP_ENDPOINT" => JaegerHelpers::OTLP_HTTP,
                              "PROSODY_MESSAGE_SPANS" => "follows_from", "PROSODY_TIMER_SPANS" => "child")
    trace_id, handler = ids(calls.fetch("a:order-1"))
    spans = trace(trace_id, 3)
    process = one(spans, "process #{topic_in}")
    expect(process[:refs].size).to eq(1)
    link, sent_trace, sent_id = process[:refs].first
    expect(link).to eq("FOLLOWS_FROM")
    expect(sent_trace).not_to eq(trace_id)
    expect(trace(sent_trace, 1).map { |s| [s[:name], s[:id]] }).to include(["send #{topic_in}", sent_id])
    expect(handler).to eq(process[:id])

    scheduled = one(spans, "schedule timer")
    timer_trace, timer_handler = ids(calls.fetch("a:timer:order-1"))
    expect(timer_trace).to eq(trace_id)
    fired = one(trace(trace_id, 4), "fire timer")
    child_of(fired, scheduled)
    expect(timer_handler).to eq(fired[:id])
  end

  it "batches spans as OTEL_BSP_* says: a queue of one drops what does not fit, and says so at exit" do
    code = <<~RUBY
      client = Prosody::Client.new(mock: true, source_system: "bsp", send_timeout: 10)
      client.send_messages(Array.new(200) { |i| { topic: "bsp-topic", key: "k\#{i}", payload: { "i" => i } } })
    RUBY
    run = lambda do |env|
      Open3.capture2e({ "OTEL_EXPORTER_OTLP_ENDPOINT" => JaegerHelpers::OTLP_HTTP }.merge(env), RbConfig.ruby,
                      "-I#{File.expand_path('../../lib', __dir__)}", "-rprosody", "-e", code)
    end
    small, status = run.call("OTEL_BSP_MAX_QUEUE_SIZE" => "1")
    expect(status).to be_success, small
    expect(small).to match(/WARN.*Spans were dropped.*dropped_span_count=[1-9]\d* max_queue_size=1/)
    default, status = run.call({})
    expect(status).to be_success, default
    expect(default).not_to include("dropped")
  end

  {
    "grpc" => { "OTEL_EXPORTER_OTLP_ENDPOINT" => JaegerHelpers::OTLP_GRPC, "OTEL_EXPORTER_OTLP_PROTOCOL" => "grpc" },
    "http/json" => { "OTEL_EXPORTER_OTLP_ENDPOINT" => JaegerHelpers::OTLP_HTTP,
                     "OTEL_EXPORTER_OTLP_PROTOCOL" => "http/json" },
    "gzip-compressed http/protobuf to the traces endpoint" => {
      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => "#{JaegerHelpers::OTLP_HTTP}/v1/traces",
      "OTEL_EXPORTER_OTLP_COMPRESSION" => "gzip"
    }
  }.each do |protocol, env|
    it "exports over #{protocol} when the OTEL variables say so" do
      calls = run_child("simple", env)
      trace_id, = ids(calls.fetch("a:order-1"))
      spans = trace(trace_id, 2)
      expect(spans.map { |s| s[:name] }).to contain_exactly("send #{topic_in}", "process #{topic_in}")
      expect(spans.map { |s| s[:service] }.uniq).to eq([service])
    end
  end
end

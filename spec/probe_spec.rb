# frozen_string_literal: true

require "json"
require "net/http"
require "open3"
require "socket"

# The probe server over real HTTP, through a subscription's life: refused before subscribe, 200
# once partitions are assigned, 503 while a handler holds a partition past stall_threshold, refused
# after the last unsubscribe; shared by the clients of one process; a port in use; /metrics read
# with the Prometheus text-format parser of the prometheus_client Python package
# (python3-prometheus-client, installed by dev/setup).
RSpec.describe "probe server" do
  let(:topic) { unique("probe") }
  let(:port) { free_port }
  let(:group) { unique("group") }

  def free_port
    server = TCPServer.new("127.0.0.1", 0)
    server.addr[1]
  ensure
    server&.close
  end

  def start(handler, **options)
    super(handler, group:, probe_port: port, probe_host: "127.0.0.1", mock_partitions: 2, **options)
  end

  # [status code (Integer), body] of GET +path+, or the connection error's class.
  def get(path, on: port)
    response = Net::HTTP.start("127.0.0.1", on, open_timeout: 2, read_timeout: 5) { |http| http.get(path) }
    [Integer(response.code), response.body]
  rescue Errno::ECONNREFUSED => e
    e.class
  end

  def json(path)
    code, body = get(path)
    [code, JSON.parse(body)]
  end

  # /metrics as parsed by prometheus_client: {"family" => [[labels, value], ...]} (sample names as
  # the parser reports them, histogram series under their family).
  def metrics
    code, body = get("/metrics")
    expect(code).to eq(200)
    script = <<~PY
      import json, sys
      from prometheus_client.parser import text_string_to_metric_families
      out = {}
      for family in text_string_to_metric_families(sys.stdin.read()):
          for s in family.samples:
              out.setdefault(s.name, []).append([s.labels, s.value])
      print(json.dumps(out))
    PY
    # Debian's interpreter, which has the package (a python3 earlier on PATH may not).
    out, err, status = Open3.capture3("/usr/bin/python3", "-c", script, stdin_data: body)
    raise "the Prometheus parser rejected /metrics: #{err}\n#{body}" unless status.success?

    JSON.parse(out)
  end

  def sample(parsed, name, **labels)
    wanted = labels.transform_keys(&:to_s)
    parsed.fetch(name, []).select { |l, _| wanted <= l }.sum { |_, v| v }
  end

  it "is refused before subscribe, ready and live once assigned, refused after unsubscribe" do
    client = mock_client(topic, probe_port: port, probe_host: "127.0.0.1", mock_partitions: 2)
    expect(get("/readyz")).to eq(Errno::ECONNREFUSED)
    subscribe_tracked(client, SpecHelpers::RecordingHandler.new)
    wait_for(message: "an assignment") { client.assigned_partitions.positive? }
    code, body = json("/readyz")
    expect(code).to eq(200)
    expect(body).to include("ready" => true)
    expect(body["assigned_partitions"]).to be_positive
    expect(json("/livez")).to eq([200, { "live" => true, "stalled" => [], "failed" => [] }])
    expect(get("/nowhere").first).to eq(404)
    client.unsubscribe
    expect(get("/readyz")).to eq(Errno::ECONNREFUSED)
    expect(get("/livez")).to eq(Errno::ECONNREFUSED)
  end

  it "answers 503 on /livez naming a partition held past stall_threshold, and recovers" do
    healthy = false
    handler = FlakyHandler.new(failures: 0) { raise "dependency down" unless healthy }
    # Retried in place, so the message holds its partition (a deferred key would not).
    client = start(handler, stall_threshold: 0.4, defer_enabled: false, retry_base: 0.05, max_retry_delay: 0.1)
    wait_for(message: "an assignment") { client.assigned_partitions.positive? }
    client.send_message(topic, "k", 1)
    code, body = wait_for(message: "a 503 from /livez") do
      answer = json("/livez")
      answer if answer.first == 503
    end
    expect(code).to eq(503)
    expect(body["live"]).to be(false)
    stalled, = body["stalled"]
    expect(stalled).to include("topic" => topic, "stall_threshold_seconds" => 0.4)
    expect(stalled["partition"]).to be_between(0, 1)
    expect(stalled["waiting_seconds"]).to be > 0.4
    healthy = true
    wait_for(message: "/livez back to 200") { json("/livez").first == 200 }
  end

  it "is one server for the clients of a process, closed with the last unsubscribe" do
    first = start(SpecHelpers::RecordingHandler.new)
    second_topic = unique("probe-second")
    second = subscribe_tracked(mock_client(second_topic, probe_port: port, probe_host: "127.0.0.1",
                                                         mock_partitions: 2), SpecHelpers::RecordingHandler.new)
    wait_for(message: "both assigned") { first.assigned_partitions.positive? && second.assigned_partitions.positive? }
    code, body = json("/readyz")
    expect(code).to eq(200)
    expect(body["assigned_partitions"]).to eq(first.assigned_partitions + second.assigned_partitions)
    first.unsubscribe
    expect(json("/readyz")).to eq([200, { "ready" => true, "assigned_partitions" => second.assigned_partitions }])
    second.unsubscribe
    expect(get("/readyz")).to eq(Errno::ECONNREFUSED)
  end

  it "fails subscribe with a SubscriptionError naming probe_port when the port is in use" do
    taken = TCPServer.new("127.0.0.1", port)
    client = mock_client(topic, probe_port: port, probe_host: "127.0.0.1")
    expect { client.subscribe(SpecHelpers::RecordingHandler.new) }
      .to raise_error(Prosody::SubscriptionError, /probe_port #{port}.*(in use|Address already)/i)
    expect(client.consumer_state).to eq(:configured)
    taken.close
    subscribe_tracked(client, SpecHelpers::RecordingHandler.new)
    wait_for(message: "the probe server") { get("/livez").is_a?(Array) }
  ensure
    taken&.close unless taken&.closed?
  end

  it "rejects a probe_host that is not an IP address, naming it" do
    expect { mock_client(topic, probe_port: port, probe_host: "my host") }
      .to raise_error(ArgumentError, /probe_host.*"my host"/)
  end

  it "starts no server in mock mode unless probe_port is given, nor with probe_port nil, false or none" do
    previous = ENV.delete("PROSODY_PROBE_PORT")
    default_port_was_free = get("/readyz", on: 8000) == Errno::ECONNREFUSED
    [{}, { probe_port: nil }, { probe_port: false }, { probe_port: "none" }].each do |options|
      client = subscribe_tracked(mock_client(unique("probe-off"), probe_host: "127.0.0.1", **options),
                                 SpecHelpers::RecordingHandler.new)
      expect(client.assigned_partitions).to be >= 0
    end
    # The default port (8000) stayed closed, if it was free; nor does anything listen on the
    # port this example reserved.
    expect(get("/readyz", on: 8000)).to eq(Errno::ECONNREFUSED) if default_port_was_free
    expect(get("/readyz")).to eq(Errno::ECONNREFUSED)
    ENV["PROSODY_PROBE_PORT"] = port.to_s
    client = subscribe_tracked(mock_client(unique("probe-env"), probe_host: "127.0.0.1"),
                               SpecHelpers::RecordingHandler.new)
    wait_for(message: "an assignment") { client.assigned_partitions.positive? }
    expect(get("/readyz").first).to eq(200)
  ensure
    ENV["PROSODY_PROBE_PORT"] = previous
  end

  it "exposes partition, outcome, handler, scheduler, librdkafka and producer metrics in the text format" do
    failing = FlakyHandler.new(failures: 1)
    client = start(failing, retry_base: 0.01, max_retry_delay: 0.02, mock_partitions: 1, defer_enabled: false)
    wait_for(message: "an assignment") { client.assigned_partitions.positive? }
    5.times { |i| client.send_message(topic, "k#{i}", { "i" => i }) }
    wait_for(message: "5 handled") { (0...5).all? { |i| failing.count("k#{i}") >= 2 } }
    parsed = wait_for(message: "metrics with the commit and consumer lag") do
      m = metrics
      m if sample(m, "prosody_partition_committed_offset", topic:) == 5 &&
           m["prosody_consumer_lag_messages"]&.any? { |l, _| l["topic"] == topic } &&
           m["prosody_producer_queue_messages"]&.any?
    end
    labels = { group:, topic:, partition: "0" }
    expect(sample(parsed, "prosody_events_total", **labels, event: "message.received")).to eq(5)
    expect(sample(parsed, "prosody_events_total", **labels, event: "message.succeeded")).to eq(5)
    expect(sample(parsed, "prosody_events_total", **labels, event: "message.failed")).to eq(5)
    expect(sample(parsed, "prosody_events_total", **labels, event: "message.retried")).to eq(5)
    expect(sample(parsed, "prosody_partition_held_messages", **labels)).to eq(0)
    expect(sample(parsed, "prosody_partition_in_flight", **labels)).to eq(0)
    expect(sample(parsed, "prosody_partition_stalled", **labels)).to eq(0)
    expect(sample(parsed, "prosody_consumer_lag_messages", **labels)).to eq(0)
    expect(sample(parsed, "prosody_handler_duration_seconds_count", group:)).to eq(10)
    expect(sample(parsed, "prosody_handler_duration_seconds_bucket", group:, le: "+Inf")).to eq(10)
    expect(sample(parsed, "prosody_scheduler_wait_seconds_count", group:)).to eq(10)
    expect(sample(parsed, "prosody_producer_records_total", result: "acknowledged")).to be >= 5
    expect(sample(parsed, "prosody_producer_ack_seconds_count")).to be >= 5
    expect(parsed["prosody_kafka_broker_rtt_seconds"]).not_to be_empty
    expect(sample(parsed, "prosody_subscription_failed", group:)).to eq(0)
  end

  it "exposes queued events, pending timers, deferred keys and timer lateness" do
    release = false
    handler = Class.new(Prosody::EventHandler) do
      define_method(:on_message) do |context, message|
        case message.payload["do"]
        when "hold" then sleep 0.01 until release
        when "timers"
          context.schedule(Time.now + 1800)
          context.schedule(Time.now)
        when "fail" then raise "dependency down"
        end
      end
      define_method(:on_timer) { |_context, _timer| nil }
    end.new
    client = start(handler, mock_partitions: 1, defer_base: 60, defer_max_delay: 60)
    wait_for(message: "an assignment") { client.assigned_partitions.positive? }
    2.times { client.send_message(topic, "held", { "do" => "hold" }) }
    client.send_message(topic, "t", { "do" => "timers" })
    client.send_message(topic, "f", { "do" => "fail" })
    labels = { group:, topic:, partition: "0" }
    wait_for(message: "the gauges") do
      m = metrics
      sample(m, "prosody_partition_queued_events", **labels) == 1 &&
        sample(m, "prosody_partition_timers_pending", **labels) == 1 &&
        sample(m, "prosody_partition_deferred_keys", **labels) == 1 &&
        sample(m, "prosody_partition_in_flight", **labels) >= 1 &&
        sample(m, "prosody_timer_lateness_seconds_count", group:) >= 1
    end
  ensure
    release = true
  end
end

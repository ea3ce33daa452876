# frozen_string_literal: true

require "json"
require "open3"
require "rbconfig"

# Trace context through Kafka in mock mode, without span export (no OTEL endpoint in this
# process): a record's W3C context reaches its handler (context.trace_context), what the handler
# sends, the timers it schedules and its dead letters. Export itself is covered against a real
# Jaeger in spec/integration/tracing_jaeger_spec.rb; the settings read from the environment, in
# child processes here (the span exporter is set up once per process).
RSpec.describe "trace context (mock)" do
  let(:topic) { unique("trace-in") }
  let(:out_topic) { unique("trace-out") }
  let(:parent) { "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" }
  let(:traced) { { "traceparent" => parent, "tracestate" => "vendor=1", "baggage" => "tenant=acme" } }

  # A handler that records [key, trace_context, headers] and runs +block+ in the call.
  def recorder(&block)
    seen = Queue.new
    handler = Class.new(Prosody::EventHandler) do
      define_method(:on_message) do |context, message|
        block&.call(context, message)
        seen << [message.key, context.trace_context, message.headers]
      end
      define_method(:on_timer) { |context, timer| seen << [timer.key, context.trace_context, :timer] }
    end
    [handler.new, seen]
  end

  def pop(queue, timeout: 20)
    wait_for(timeout:, message: "a handler call") { !queue.empty? }
    queue.pop
  end

  it "hands a record's trace context to its handler" do
    handler, seen = recorder
    client = start(handler)
    client.send_message(topic, "k", { "n" => 1 }, headers: traced)
    key, context, = pop(seen)
    expect(key).to eq("k")
    expect(context).to eq(traced)
  end

  it "gives an empty trace_context to a record without one" do
    handler, seen = recorder
    client = start(handler)
    client.send_message(topic, "k", { "n" => 1 })
    _, context, headers = pop(seen)
    expect(context).to eq({})
    expect(headers.keys & %w[traceparent tracestate baggage]).to eq([])
  end

  it "carries the handler's trace context on what the handler sends, unless the record has its own" do
    own = "00-11111111111111111111111111111111-2222222222222222-01"
    sender = mock_client(topic, source_system: "relay")
    handler, = recorder do |_context, message|
      sender.send_message(out_topic, message.key, { "relayed" => true })
      sender.send_message(out_topic, "#{message.key}-own", { "relayed" => true }, headers: { "traceparent" => own })
      sender.send_messages([{ topic: out_topic, key: "#{message.key}-batch", payload: { "relayed" => true } }])
    end
    subscribe_tracked(sender, handler)
    downstream, seen = recorder
    downstream_client = mock_client(out_topic)
    subscribe_tracked(downstream_client, downstream)
    sender.send_message(topic, "k", { "n" => 1 }, headers: traced)
    got = Array.new(3) { pop(seen) }.to_h { |key, context, _| [key, context] }
    expect(got["k"]).to eq(traced)
    expect(got["k-batch"]).to eq(traced)
    expect(got["k-own"]).to eq("traceparent" => own)
  end

  it "sends nothing extra outside a handler" do
    handler, seen = recorder
    client = start(handler)
    client.send_message(topic, "k", { "n" => 1 })
    expect(pop(seen)[1]).to eq({})
  end

  it "keeps the trace context of the handler call that scheduled a timer for the timer's handler" do
    handler, seen = recorder { |context, _message| context.schedule(Time.now) }
    client = start(handler)
    client.send_message(topic, "k", { "n" => 1 }, headers: traced)
    first = pop(seen)
    timer = pop(seen)
    expect(first[1]).to eq(traced)
    expect(timer[2]).to eq(:timer)
    expect(timer[1]["traceparent"]).to eq(parent)
  end

  it "gives dead letters the trace context of the failed message" do
    dlq = unique("trace-dlq")
    failing = Class.new(Prosody::EventHandler) do
      permanent :on_message, ArgumentError
      define_method(:on_message) { |_context, _message| raise ArgumentError, "bad order" }
    end
    start(failing.new, mode: :low_latency, failure_topic: dlq).send_message(topic, "k", { "n" => 1 }, headers: traced)
    letters, seen = recorder
    subscribe_tracked(mock_client(dlq), letters)
    _, context, headers = pop(seen)
    expect(context).to eq(traced)
    expect(headers["traceparent"]).to eq(parent)
  end

  # Runs +code+ in a child Ruby (mock mode) with +env+ and Ruby +options+; returns
  # [stdout + stderr, status].
  def child(code, env = {}, *options)
    lib = File.expand_path("../lib", __dir__)
    Open3.capture2e(env, RbConfig.ruby, *options, "-I#{lib}", "-rprosody", "-e", code)
  end

  # Expects Client.new, in a child with +env+, to raise ArgumentError naming each of +words+.
  def expect_refused(env, *words)
    out, status = child(<<~RUBY, env)
      begin
        Prosody::Client.new(mock: true)
      rescue ArgumentError => e
        puts "ArgumentError: \#{e.message}"
      end
    RUBY
    expect(status).to be_success
    words.each { |word| expect(out).to include(word) }
  end

  it "refuses an OTLP protocol it does not know, naming the variable and the value" do
    expect_refused({ "OTEL_EXPORTER_OTLP_ENDPOINT" => "http://127.0.0.1:4318",
                     "OTEL_EXPORTER_OTLP_PROTOCOL" => "carrier-pigeon" },
                   "ArgumentError", "OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
  end

  it "refuses an https:// OTLP endpoint with a clear error" do
    expect_refused({ "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => "https://collector.example:4318/v1/traces" },
                   "ArgumentError", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://")
  end

  it "follows OTEL_TRACES_SAMPLER: always_off records nothing and marks the context not sampled" do
    # An endpoint nobody listens on: with nothing sampled, nothing is ever exported to it.
    env = { "OTEL_EXPORTER_OTLP_ENDPOINT" => "http://127.0.0.1:9", "OTEL_TRACES_SAMPLER" => "always_off" }
    out, status = child(<<~RUBY, env)
      seen = Queue.new
      client = Prosody::Client.new(mock: true, group_id: "g", subscribed_topics: "sampled", source_system: "s",
                                   send_timeout: 10)
      client.subscribe(Class.new(Prosody::EventHandler) { define_method(:on_message) { |c, _| seen << c.trace_context } }.new)
      client.send_message("sampled", "k", { "n" => 1 })
      puts "CONTEXT \#{seen.pop.to_a.inspect}"
      client.unsubscribe
    RUBY
    expect(status).to be_success
    expect(out).to match(/CONTEXT \[\["traceparent", "00-\h{32}-\h{16}-00"\]\]/)
    expect(out).not_to include("ERROR")
  end

  it "runs the handler inside an OpenTelemetry context whose parent is the engine's span (stand-in gem)" do
    # The opentelemetry gems cannot be installed here (no RubyGems): spec/support/opentelemetry_stand_in
    # implements just the opentelemetry-api calls Prosody and the README's handler make.
    stand_in = File.expand_path("support/opentelemetry_stand_in", __dir__)
    out, status = child(<<~'RUBY', {}, "-I#{stand_in}", "-ropentelemetry")
      # The README's handler (as in its "Using Tracing in Your Application" section), sending
      # one record from inside its span.
      class MyHandler < Prosody::EventHandler
        def initialize(client)
          super()
          @client = client
          @tracer = OpenTelemetry.tracer_provider.tracer('my-service-name')
        end

        def on_message(context, message)
          return RECEIVED << [message.key, context.trace_context, message.headers] if message.key == "downstream"

          HANDLED << context.trace_context
          @tracer.in_span('process-message') do |span|
            span.add_event('message.received', attributes: { 'message.payload' => message.payload.to_json })
            @client.send_message("otel-out", "downstream", { "from" => message.key })
          end
        end
      end
      HANDLED = Queue.new
      RECEIVED = Queue.new
      client = Prosody::Client.new(mock: true, group_id: "g", subscribed_topics: %w[otel-in otel-out], source_system: "s",
                                   send_timeout: 10)
      client.subscribe(MyHandler.new(client))
      client.send_message("otel-in", "k", { "n" => 1 },
                          headers: { "traceparent" => "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" })
      handled = HANDLED.pop
      span = OpenTelemetry::SPANS.pop
      _, downstream, = RECEIVED.pop
      puts JSON.generate("handled" => handled, "span" => span.to_h, "downstream" => downstream)
      client.unsubscribe
    RUBY
    expect(status).to be_success, out
    result = JSON.parse(out.lines.grep(/\A\{/).last)
    _, trace_id, handle_span, = result["handled"]["traceparent"].split("-")
    expect(trace_id).to eq("0af7651916cd43dd8448eb211c80319c")
    # The handler's own span is a child of the span Prosody wraps the call in...
    expect(result["span"]).to include("trace_id" => trace_id, "parent_id" => handle_span, "name" => "process-message")
    # ...and what it sent inside that span carries the handler's span.
    expect(result["downstream"]["traceparent"]).to eq("00-#{trace_id}-#{result['span']['span_id']}-01")
  end
end

# frozen_string_literal: true

# What span export costs, on the mock cluster: the consume benchmark's handler (reads the payload;
# 4 partitions, 1,000 keys) and send_messages batches of 100, in a process with no OTLP endpoint
# and in one exporting every span to the local Jaeger (dev/services; default sampler: every root
# is sampled, so each message's process and handle spans, and each record's send span, are
# recorded and batched out). Span export is set up once per process, so each measurement runs in
# a child process; untraced and traced children alternate, ROUNDS of each, and the ratio of the
# bests is printed, with how many spans the SDK dropped because its queue was full (exporting
# fewer spans makes the traced run cheaper, so a ratio means little without it).
#
# Usage: ruby -Ilib bench/tracing.rb [MESSAGES]   (make bench starts Jaeger first)

require_relative "support"

MESSAGES = Integer(ARGV[0] || 100_000)
ROUNDS = Integer(ENV.fetch("TRACING_ROUNDS", 3))
JAEGER = ENV.fetch("OTLP_ENDPOINT", "http://127.0.0.1:4318")

# Reads the payload.
class ReadingHandler < BenchHandler
  def work(message)
    message.payload
  end
end

# The child: prints "consume=<msg/s> produce=<records/s>".
def measure(count)
  topic = "bench-trace-#{SecureRandom.hex(4)}"
  fill(topic, 4, count, 1_000)
  handler = ReadingHandler.new(count)
  client = Prosody::Client.new(mock: true, group_id: "bench-#{SecureRandom.hex(4)}", subscribed_topics: topic,
                               max_concurrency: 32)
  _, consume = subscription_rates(client, handler, count)
  out = "bench-trace-out-#{SecureRandom.hex(4)}"
  Prosody::Native.mock_create_topic(out, 4)
  batches = (0...count).each_slice(100).map do |ids|
    ids.map { |i| { topic: out, key: "k#{i % 1_000}", payload: { "id" => i } } }
  end
  client.send_messages(batches.first) # the producer's start-up is not measured
  GC.start
  started = monotonic
  batches.each { |batch| client.send_messages(batch) }
  produce = count / (monotonic - started)
  puts format("consume=%<consume>.0f produce=%<produce>.0f", consume:, produce:)
end

if ARGV[1] == "child"
  measure(MESSAGES)
  exit
end

def child(traced)
  env = traced ? { "OTEL_EXPORTER_OTLP_ENDPOINT" => JAEGER, "OTEL_SERVICE_NAME" => "prosody-bench" } : {}
  command = [RbConfig.ruby, "-I#{File.expand_path('../lib', __dir__)}", __FILE__, MESSAGES.to_s, "child"]
  out = IO.popen(env, command, err: %i[child out], &:read)
  raise "bench child failed: #{out}" unless $CHILD_STATUS.success?

  rates = out.scan(/(consume|produce)=([\d.]+)/).to_h { |name, rate| [name.to_sym, Float(rate)] }
  # The SDK drops spans when its queue (OTEL_BSP_MAX_QUEUE_SIZE, 2,048 by default) is full, and
  # says how many at exit through Prosody.logger (the child's stderr, read with its stdout).
  rates.merge(dropped: Integer(out[/dropped_span_count=(\d+)/, 1] || 0))
end

puts "Prosody tracing benchmark (mock cluster, #{MESSAGES} messages, spans to #{JAEGER}, " \
     "#{Etc.nprocessors} cores)"
best = { off: Hash.new(0.0), on: Hash.new(0.0) }
ROUNDS.times do
  { off: false, on: true }.each do |mode, traced|
    rates = child(traced)
    rates.slice(:consume, :produce).each { |name, rate| best[mode][name] = [best[mode][name], rate].max }
    puts format("  tracing %<mode>-3s consume %<consume>8.0f msg/s | send_messages %<produce>8.0f records/s | " \
                "spans the SDK dropped (queue full) %<dropped>d of %<spans>d",
                mode:, spans: traced ? 2 * MESSAGES : 0, **rates)
  end
end
%i[consume produce].each do |name|
  puts format("tracing exported vs untraced, %<name>s: %<on>8.0f vs %<off>8.0f per second | ratio %<ratio>.2f " \
              "(best of %<rounds>d each, alternated)",
              name:, on: best[:on][name], off: best[:off][name], ratio: best[:on][name] / best[:off][name],
              rounds: ROUNDS)
end

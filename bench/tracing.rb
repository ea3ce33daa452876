# frozen_string_literal: true

# What span export costs, on the mock cluster: the consume benchmark's handler (reads the payload;
# 4 partitions, 1,000 keys) and send_messages batches of 100, in a process with no OTLP endpoint
# and in one exporting every span to the local Jaeger (dev/services; default sampler: every root
# is sampled, so each message's process and handle spans, and each record's send span, are
# recorded and batched out; the SDK's queue is sized so that none is dropped). Span export is set
# up once per process, so each measurement runs in a child process; untraced and traced children
# alternate, ROUNDS of each, and the ratio of the bests is printed, with how many spans the SDK
# dropped because its queue was full (exporting fewer spans makes the traced run cheaper, so a
# ratio means little without it). It also prints the
# CPU each side spends, since Jaeger runs on the same cores as the benchmark: this process's CPU
# per consumed message, untraced and traced, and Jaeger's CPU per span it received.
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

# CPU seconds this process has used, all threads.
def cpu_seconds
  Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
end

# Consumes +count+ messages; returns [msg/s, µs of this process's CPU per message].
def measure_consume(count)
  topic = "bench-trace-#{SecureRandom.hex(4)}"
  fill(topic, 4, count, 1_000)
  handler = ReadingHandler.new(count)
  client = Prosody::Client.new(mock: true, group_id: "bench-#{SecureRandom.hex(4)}", subscribed_topics: topic,
                               max_concurrency: 32)
  cpu = cpu_seconds
  _, consume = subscription_rates(client, handler, count)
  [client, consume, (cpu_seconds - cpu) * 1e6 / count]
end

# Sends +count+ records through +client+ in batches of 100; returns records/s.
def measure_produce(client, count)
  out = "bench-trace-out-#{SecureRandom.hex(4)}"
  Prosody::Native.mock_create_topic(out, 4)
  batches = (0...count).each_slice(100).map do |ids|
    ids.map { |i| { topic: out, key: "k#{i % 1_000}", payload: { "id" => i } } }
  end
  client.send_messages(batches.first) # the producer's start-up is not measured
  GC.start
  started = monotonic
  batches.each { |batch| client.send_messages(batch) }
  count / (monotonic - started)
end

# The child: prints "consume=<msg/s> produce=<records/s> consume_cpu=<µs per message>".
def measure(count)
  client, consume, consume_cpu = measure_consume(count)
  produce = measure_produce(client, count)
  puts format("consume=%<consume>.0f produce=%<produce>.0f consume_cpu=%<consume_cpu>.2f",
              consume:, produce:, consume_cpu:)
end

if ARGV[1] == "child"
  measure(MESSAGES)
  exit
end

# Jaeger's CPU seconds so far, from /proc (nil when its pid file from dev/services is absent).
def jaeger_cpu_seconds
  pid = File.read(File.join(ENV.fetch("PROSODY_DEV_RUN", "/tmp/prosody-dev"), "jaeger.pid")).strip
  fields = File.read("/proc/#{pid}/stat").split(") ").last.split
  (Integer(fields[11]) + Integer(fields[12])) / Float(Etc.sysconf(Etc::SC_CLK_TCK))
rescue SystemCallError, ArgumentError
  nil
end

# Runs a child, traced or not; returns its rates, the spans its SDK dropped, and Jaeger's CPU per
# span it received (0 untraced, or when Jaeger's pid is unknown).
def child(traced)
  return run_child(false).merge(jaeger: 0) unless traced

  jaeger_before = jaeger_cpu_seconds
  rates = run_child(true)
  jaeger_after = jaeger_cpu_seconds if jaeger_before
  rates.merge(jaeger: jaeger_after ? (jaeger_after - jaeger_before) * 1e6 / ((2 * MESSAGES) - rates[:dropped]) : 0)
end

# Runs a child; returns its rates and the spans its SDK dropped.
def run_child(traced)
  # The SDK's queue holds every span of the run, so none is dropped: at these rates the default
  # 2,048 overflowed (1.5-13% of spans dropped in 2026-11-30's runs), which made the traced run
  # cheaper than exporting everything is.
  env = if traced
          { "OTEL_EXPORTER_OTLP_ENDPOINT" => JAEGER, "OTEL_SERVICE_NAME" => "prosody-bench",
            "OTEL_BSP_MAX_QUEUE_SIZE" => (2 * MESSAGES).to_s }
        else
          {}
        end
  command = [RbConfig.ruby, "-I#{File.expand_path('../lib', __dir__)}", __FILE__, MESSAGES.to_s, "child"]
  out = IO.popen(env, command, err: %i[child out], &:read)
  raise "bench child failed: #{out}" unless $CHILD_STATUS.success?

  rates = out.scan(/(consume|produce|consume_cpu)=([\d.]+)/).to_h { |name, rate| [name.to_sym, Float(rate)] }
  # The SDK drops spans when its queue (OTEL_BSP_MAX_QUEUE_SIZE, 2,048 by default) is full, and
  # says how many at exit through Prosody.logger (the child's stderr, read with its stdout).
  rates.merge(dropped: Integer(out[/dropped_span_count=(\d+)/, 1] || 0))
end

puts "Prosody tracing benchmark (mock cluster, #{MESSAGES} messages, spans to #{JAEGER}, " \
     "#{Etc.nprocessors} cores)"
best = { off: Hash.new(0.0), on: Hash.new(0.0) }
cpu = { off: [], on: [], jaeger: [] }
ROUNDS.times do
  { off: false, on: true }.each do |mode, traced|
    rates = child(traced)
    rates.slice(:consume, :produce).each { |name, rate| best[mode][name] = [best[mode][name], rate].max }
    cpu[mode] << rates[:consume_cpu]
    cpu[:jaeger] << rates[:jaeger] if traced
    puts format("  tracing %<mode>-3s consume %<consume>8.0f msg/s (%<consume_cpu>5.1f µs CPU each) | " \
                "send_messages %<produce>8.0f records/s | spans the SDK dropped (queue full) %<dropped>d of %<spans>d",
                mode:, spans: traced ? 2 * MESSAGES : 0, **rates)
  end
end
puts format("CPU while consuming: this process %<off>.1f µs per message untraced, %<on>.1f traced; " \
            "Jaeger %<jaeger>.1f µs per span it received, on the same %<cores>d cores (lowest of each)",
            off: cpu[:off].min, on: cpu[:on].min, jaeger: cpu[:jaeger].min, cores: Etc.nprocessors)
%i[consume produce].each do |name|
  puts format("tracing exported vs untraced, %<name>s: %<on>8.0f vs %<off>8.0f per second | ratio %<ratio>.2f " \
              "(best of %<rounds>d each, alternated)",
              name:, on: best[:on][name], off: best[:off][name], ratio: best[:on][name] / best[:off][name],
              rounds: ROUNDS)
end

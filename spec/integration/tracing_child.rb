# frozen_string_literal: true

# A process whose spans go to Jaeger (OTEL_* variables set by spec/integration/tracing_jaeger_spec.rb),
# on the real Kafka. Scenario "full" (Cassandra timers):
# - "origin" sends "order-1" and "poison" to topic_in;
# - group A handles order-1: sends it on to topic_out and schedules a timer (due now); its
#   on_timer runs later; poison fails permanently and goes to the dead-letter topic;
# - group B handles topic_out, group C the dead-letter topic.
# Scenario "simple": origin sends one record, group A handles it.
# Writes one JSON line to out_path: each handler call's trace_context, by what it was.
$LOAD_PATH.unshift(File.expand_path("../../lib", __dir__))
require "prosody"
require "json"
require "timeout"

scenario, bootstrap, cassandra, keyspace, topic_in, topic_out, dlq, out_path = ARGV
seen = Queue.new
common = { bootstrap_servers: bootstrap, send_timeout: 15, commit_interval: 0.1 }

# Records each call's trace_context; group A's handler relays, schedules and fails as above.
class Recorder < Prosody::EventHandler
  permanent :on_message, ArgumentError

  def initialize(name, seen, relay = nil)
    super()
    @name = name
    @seen = seen
    @relay = relay
  end

  def on_message(context, message)
    @seen << ["#{@name}:#{message.key}", context.trace_context]
    raise ArgumentError, "poison pill" if message.key == "poison"
    return unless @relay

    client, topic = @relay
    client.send_message(topic, message.key, { "relayed" => message.payload }) if topic
    context.schedule(Time.now) if topic
  end
end

# Group A's handler with Cassandra timers.
class TimerRecorder < Recorder
  def on_timer(context, timer)
    @seen << ["#{@name}:timer:#{timer.key}", context.trace_context]
  end
end

full = scenario == "full"
a_options = if full
              { cassandra_nodes: cassandra, cassandra_keyspace: keyspace, mode: :low_latency,
                failure_topic: dlq }
            else
              {}
            end
a = Prosody::Client.new(**common, group_id: "#{topic_in}-a", subscribed_topics: topic_in, source_system: "a",
                                  **a_options)
clients = [a]
a.subscribe((full ? TimerRecorder : Recorder).new("a", seen, [a, full ? topic_out : nil]))
if full
  b = Prosody::Client.new(**common, group_id: "#{topic_in}-b", subscribed_topics: topic_out, source_system: "b")
  b.subscribe(Recorder.new("b", seen))
  c = Prosody::Client.new(**common, group_id: "#{topic_in}-c", subscribed_topics: dlq, source_system: "c")
  c.subscribe(Recorder.new("c", seen))
  clients += [b, c]
end

origin = Prosody::Client.new(**common, source_system: "origin")
origin.send_message(topic_in, "order-1", { "id" => 1 })
origin.send_message(topic_in, "poison", { "id" => 2 }) if full

wanted = full ? %w[a:order-1 a:poison b:order-1 c:poison a:timer:order-1] : %w[a:order-1]
calls = {}
Timeout.timeout(90) do
  until (wanted - calls.keys).empty?
    what, context = seen.pop
    calls[what] ||= context
  end
end
clients.each(&:unsubscribe)
File.write(out_path, JSON.generate(calls))
# Spans still batched leave in Prosody's at_exit hook.

# frozen_string_literal: true

# A consumer process for the timer crash spec: schedules a timer at payload "at" for each
# message's key (Cassandra store), writes "<key> <at>" once it is stored, and "DONE" after
# +expected+ messages; the spec then SIGKILLs it before any timer is due.
$LOAD_PATH.unshift(File.expand_path("../../lib", __dir__))
require "prosody"

bootstrap, cassandra, keyspace, topic, group, expected, out_path = ARGV
expected = Integer(expected)
Prosody.logger = Logger.new(File::NULL)

# Schedules and records; never expected to see a timer fire.
class Scheduler < Prosody::EventHandler
  def initialize(out, expected)
    super()
    @out = out
    @expected = expected
    @count = 0
  end

  def on_message(context, message)
    at = message.payload.fetch("at")
    context.schedule(Time.at(at))
    @out.puts("#{message.key} #{at}")
    @count += 1
    @out.puts("DONE") if @count == @expected
    @out.flush
  end

  def on_timer(_context, timer)
    @out.puts("FIRED-EARLY #{timer.key} #{timer.time.to_i}")
    @out.flush
  end
end

out = File.open(out_path, "a")
client = Prosody::Client.new(bootstrap_servers: bootstrap, group_id: group, subscribed_topics: topic,
                             cassandra_nodes: cassandra, cassandra_keyspace: keyspace, commit_interval: 0.1)
client.subscribe(Scheduler.new(out, expected))
sleep

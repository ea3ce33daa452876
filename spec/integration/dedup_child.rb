# frozen_string_literal: true

# A consumer process for the deduplication crash spec: handles every message (writing
# "HANDLED <id>"), with a commit interval long enough that nothing is committed before the spec
# SIGKILLs it. It writes "RECORDED" once it handled +count+ messages and the engine stored their
# deduplication records in Cassandra.
$LOAD_PATH.unshift(File.expand_path("../../lib", __dir__))
require "prosody"

bootstrap, cassandra, keyspace, topic, group, count, out_path = ARGV
out = File.open(out_path, "a")
out.sync = true
handled = Queue.new
stored = 0
logger = Logger.new(out, level: Logger::DEBUG)
logger.formatter = lambda do |severity, _time, _progname, message|
  stored += Integer(message[/stored (\d+) deduplication record/, 1] || 0)
  done = stored >= Integer(count) && handled.size >= Integer(count)
  "#{severity} #{message}\n#{done ? "RECORDED\n" : ''}"
end
Prosody.logger = logger

# Records each message's id.
class Handled < Prosody::EventHandler
  def initialize(out, handled)
    super()
    @out = out
    @handled = handled
  end

  def on_message(_context, message)
    @out.puts("HANDLED #{message.payload['id']}")
    @handled << message.payload["id"]
  end
end

client = Prosody::Client.new(bootstrap_servers: bootstrap, group_id: group, subscribed_topics: topic,
                             cassandra_nodes: cassandra, cassandra_keyspace: keyspace, commit_interval: 600)
client.subscribe(Handled.new(out, handled))
sleep

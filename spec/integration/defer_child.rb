# frozen_string_literal: true

# A consumer process for the deferral crash spec: every handler call fails (transiently), so
# each key is deferred on its first message and its later messages join its deferred list. It
# writes "ALL-DEFERRED" once +keys+ keys were deferred and +later+ later messages joined their
# lists; the spec then SIGKILLs it, before any deferred retry is due.
$LOAD_PATH.unshift(File.expand_path("../../lib", __dir__))
require "prosody"

bootstrap, cassandra, keyspace, topic, group, keys, later, out_path = ARGV
out = File.open(out_path, "a")
out.sync = true
counts = Hash.new(0)
logger = Logger.new(out, level: Logger::DEBUG)
logger.formatter = lambda do |severity, _time, _progname, message|
  counts[:deferred] += 1 if message.include?("deferring its key")
  counts[:joined] += 1 if message.include?("joins its key's deferred messages")
  done = counts[:deferred] >= Integer(keys) && counts[:joined] >= Integer(later)
  "#{severity} #{message}\n#{done ? "ALL-DEFERRED\n" : ''}"
end
Prosody.logger = logger

# Fails every call.
class Failing < Prosody::EventHandler
  def on_message(_context, message)
    raise "downstream unavailable for #{message.key}"
  end
end

client = Prosody::Client.new(bootstrap_servers: bootstrap, group_id: group, subscribed_topics: topic,
                             cassandra_nodes: cassandra, cassandra_keyspace: keyspace, commit_interval: 0.1,
                             defer_base: 20, defer_max_delay: 20, defer_failure_threshold: 1.0)
client.subscribe(Failing.new)
sleep

# frozen_string_literal: true

# The fork spec's process: a parent with a subscribed and an idle client forks twice. The first
# child just exits; the second checks that every inherited client raises Prosody::ClientError
# without waiting, then consumes and produces with a client of its own. The parent then checks
# that its clients still work. Prints "OK <step>" lines; exits non-zero on any failure.
#
# Usage: fork_scenario.rb mock | fork_scenario.rb kafka BOOTSTRAP
$LOAD_PATH.unshift(File.expand_path("../../lib", __dir__))
require "prosody"
require "securerandom"
require "timeout"
require "English"

$stdout.sync = true
Prosody.logger = Logger.new($stderr, level: Logger::WARN)
mode, bootstrap = ARGV
OPTIONS = (mode == "kafka" ? { bootstrap_servers: bootstrap } : { mock: true }).freeze

# Hands every message to a queue.
class Collector < Prosody::EventHandler
  def initialize(queue)
    super()
    @queue = queue
  end

  def on_message(_context, message)
    @queue << [message.key, message.payload]
  end
end

def fresh_topic(label)
  topic = "fork-#{label}-#{SecureRandom.hex(4)}"
  Prosody::Native.create_topic(OPTIONS[:bootstrap_servers], topic, 2) if OPTIONS[:bootstrap_servers]
  topic
end

def consumer(topic, queue)
  client = Prosody::Client.new(**OPTIONS, group_id: "group-#{topic}", source_system: "fork-spec",
                                          subscribed_topics: topic, send_timeout: 10)
  client.subscribe(Collector.new(queue))
  client
end

def expect_message(queue, key, payload)
  got = Timeout.timeout(30) { queue.pop }
  raise "expected #{[key, payload].inspect}, got #{got.inspect}" unless got == [key, payload]
end

def wait_child(pid)
  Timeout.timeout(60) { Process.wait(pid) }
  $CHILD_STATUS
rescue Timeout::Error
  Process.kill(:KILL, pid)
  Process.wait(pid)
  raise "child #{pid} hung"
end

parent_topic = fresh_topic("parent")
parent_queue = Queue.new
subscribed = consumer(parent_topic, parent_queue)
idle = Prosody::Client.new(**OPTIONS, send_timeout: 10)
idle.send_message(parent_topic, "before", { "n" => 1 })
expect_message(parent_queue, "before", { "n" => 1 })
puts "OK parent before fork"

status = wait_child(fork { exit 0 })
raise "a child that merely exits ended with #{status.inspect}" unless status.success?

puts "OK child exited normally"

parent_pid = Process.pid
status = wait_child(fork do
  {
    "send_message" => -> { idle.send_message(parent_topic, "child", {}) },
    "subscribe" => -> { idle.subscribe(Collector.new(Queue.new)) },
    "unsubscribe" => -> { subscribed.unsubscribe },
    "consumer_state" => -> { subscribed.consumer_state },
    "is_stalled?" => -> { subscribed.is_stalled? },
    "assigned_partitions" => -> { subscribed.assigned_partitions },
    "source_system" => -> { idle.source_system }
  }.each do |name, call|
    Timeout.timeout(5) { call.call }
    raise "#{name} on an inherited client did not raise"
  rescue Prosody::ClientError => e
    raise "#{name}: unexpected message #{e.message}" unless e.message.include?("created in process #{parent_pid}")
  end
  puts "OK inherited clients raise"
  topic = fresh_topic("child")
  queue = Queue.new
  own = consumer(topic, queue)
  own.send_message(topic, "child", { "from" => "child" })
  expect_message(queue, "child", { "from" => "child" })
  own.unsubscribe
  puts "OK child's own client consumes and produces"
end)
raise "the working child ended with #{status.inspect}" unless status.success?

idle.send_message(parent_topic, "after", { "n" => 2 })
expect_message(parent_queue, "after", { "n" => 2 })
subscribed.unsubscribe
puts "OK parent after fork"

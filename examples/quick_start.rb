# frozen_string_literal: true

# Quick start in mock mode: an in-process Kafka, no services to run.
# Run it with `make demo`, or `ruby -Ilib examples/quick_start.rb` after `rake compile`.

require "prosody"

# Prints each message and tells the main thread it arrived.
class GreetingHandler < Prosody::EventHandler
  def initialize(arrived)
    super()
    @arrived = arrived
  end

  def on_message(_context, message)
    puts "#{message.key}: #{message.payload['text']} (partition #{message.partition}, offset #{message.offset})"
    @arrived << message.key
  end
end

client = Prosody::Client.new(
  mock: true, # drop this and set bootstrap_servers (or PROSODY_BOOTSTRAP_SERVERS) for a real cluster
  group_id: "quick-start",
  # Records carry a source-system header; a client skips records whose source system is its own
  # group. A different source system lets this client consume what it sends.
  source_system: "quick-start-producer",
  subscribed_topics: "greetings"
)

arrived = Queue.new
client.subscribe(GreetingHandler.new(arrived))

client.send_message("greetings", "alice", { "text" => "Hello, Kafka!" })
client.send_message("greetings", "bob", { "text" => "Hi from Prosody" })
client.send_message("greetings", "alice", { "text" => "Messages of one key arrive in order" })

3.times { arrived.pop }
client.unsubscribe # lets in-flight handlers finish, commits, leaves the group
puts "Done."

# frozen_string_literal: true

require "open3"
require "rbconfig"

# Client#unsubscribe works from a signal trap handler, where Ruby allows no locks: it hands the
# shutdown to a new thread and returns it; and a second unsubscribe waits for one in progress.
RSpec.describe "Stopping on a signal" do
  # Subscribed on the mock cluster, the process sends itself TERM once a message was handled; the
  # trap handler unsubscribes.
  let(:child) do
    <<~'RUBY'
      require "prosody"

      handled = Queue.new
      handler = Class.new(Prosody::EventHandler) do
        define_method(:on_message) { |_context, message| handled << message.key }
      end
      client = Prosody::Client.new(mock: true, group_id: "signal", source_system: "signal-producer",
                                   subscribed_topics: "signal", send_timeout: 10)
      client.subscribe(handler.new)
      stopping = Queue.new
      trap("TERM") { stopping << client.unsubscribe }

      client.send_message("signal", "k", { "n" => 1 })
      handled.pop
      Process.kill("TERM", Process.pid)

      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 20
      until client.consumer_state == :configured
        raise "still #{client.consumer_state} 20 s after TERM" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

        sleep 0.01
      end
      worker = stopping.pop
      raise "unsubscribe in a trap handler returned #{worker.inspect}, not a Thread" unless worker.is_a?(Thread)

      worker.join
      left = Thread.list.select { |thread| thread.name&.start_with?("prosody-processor") }
      raise "processor threads left after the shutdown thread ended: #{left}" unless left.empty?
      raise "unsubscribe outside a trap handler should return nil" unless client.unsubscribe.nil?

      puts "STOPPED ON TERM"
    RUBY
  end

  it "unsubscribes from a TERM trap handler: no ThreadError, and the returned thread does the work" do
    output, status = Open3.capture2e({ "RUBYOPT" => nil, "RUBYLIB" => nil }, "timeout", "-s", "KILL", "60",
                                     RbConfig.ruby, "-I", File.expand_path("../lib", __dir__), "-e", child)
    expect(output).not_to include("ThreadError")
    expect(output).not_to include("trap context")
    expect(output).to include("STOPPED ON TERM")
    expect(status.success?).to be(true), "child exited with #{status}:\n#{output}"
  end

  # The at_exit hook relies on it: a process whose trap handler started the shutdown and then
  # exits must not end while that shutdown is still draining.
  it "makes a second unsubscribe wait until the one in progress finished" do
    topic = unique("signal")
    gate = Queue.new
    events = Queue.new
    handler = SpecHelpers::RecordingHandler.new do
      events << :handler_started
      gate.pop
      events << :handler_done
    end
    client = subscribe_tracked(mock_client(topic, shutdown_timeout: 10), handler)
    client.send_message(topic, "k", 1)
    wait_for(message: "the handler to start") { !events.empty? }
    expect(events.pop).to eq(:handler_started)

    first = Thread.new { client.unsubscribe }
    wait_for(message: "the first unsubscribe to wait for the handler") { first.status == "sleep" }
    second = Thread.new { client.unsubscribe }
    wait_for(message: "the second unsubscribe to wait or return") { second.status == "sleep" || !second.alive? }
    expect(second).to be_alive

    gate << :go
    expect(second.join(20)).to eq(second)
    expect(events.pop).to eq(:handler_done)
    expect(prosody_threads).to be_empty
    expect(first.join(20)).to eq(first)
  ensure
    gate << :go
  end
end

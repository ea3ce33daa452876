# frozen_string_literal: true

# An engine thread that dies (here the poll thread, by an injected panic standing for a bug) is
# never silent: the panic reaches Prosody.logger, is_stalled? turns true, and unsubscribe stops
# what is left and raises Prosody::Error naming the failure instead of hanging; the client can
# subscribe again.
RSpec.describe "A dead engine thread" do
  let(:topic) { unique("engine-failure") }

  it "is logged, shows in is_stalled?, and is reported by unsubscribe" do
    handler = SpecHelpers::RecordingHandler.new
    client = start(handler)
    client.send_message(topic, "k", 1)
    wait_for(message: "the first message") { handler.count == 1 }
    expect(client.is_stalled?).to be(false)

    expect(client.instance_variable_get(:@native).inject_fault).to be(true)
    wait_for(message: "the panic in the log") { log_output.include?("the poll thread panicked: injected fault") }
    expect(log_output).to match(/ERROR -- prosody: .*panic in thread prosody-poll at \S+: injected fault/)
    expect(client.is_stalled?).to be(true)

    expect { Timeout.timeout(30) { client.unsubscribe } }
      .to raise_error(Prosody::Error,
                      /the subscription failed and was stopped: the poll thread panicked: injected fault/)
    expect(client.consumer_state).to eq(:configured)
    expect(client.is_stalled?).to be(false)
    wait_for(message: "the processor thread to end") { prosody_threads.empty? }

    again = SpecHelpers::RecordingHandler.new
    subscribe_tracked(client, again)
    client.send_message(topic, "k", 2)
    wait_for(message: "a message after subscribing again") { again.payloads.include?(2) }
  end
end

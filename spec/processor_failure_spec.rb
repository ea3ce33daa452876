# frozen_string_literal: true

# A processor thread that dies (an exception escaping the reactor, on either async major) is never
# a hang: it is logged with the exception, is_stalled? turns true, the events it had not finished
# are not committed (a new subscription gets them again), and unsubscribe raises Prosody::Error.
RSpec.describe "A dead processor thread" do
  let(:topic) { unique("processor-failure") }

  it "is logged, shows in is_stalled?, loses nothing, and is reported by unsubscribe" do
    handler = SpecHelpers::RecordingHandler.new
    client = start(handler, group: unique("group"))
    client.send_message(topic, "k", 1)
    wait_for(message: "the first message") { handler.payloads == [1] }

    client.instance_variable_get(:@processor).thread.raise(RuntimeError, "killed by the spec")
    died = "the processor thread died: RuntimeError: killed by the spec"
    wait_for(message: "the error line") { log_output.include?(died) }
    expect(client.is_stalled?).to be(true)
    client.send_message(topic, "k", 2) # taken by the engine, never handled

    expect { Timeout.timeout(30) { client.unsubscribe } }
      .to raise_error(Prosody::Error, /the processor thread had died \(RuntimeError: killed by the spec\)/)
    expect(client.is_stalled?).to be(false)

    again = SpecHelpers::RecordingHandler.new
    subscribe_tracked(client, again)
    wait_for(message: "the unhandled message again") { again.payloads.include?(2) }
    expect(again.payloads).not_to include(1)
  end
end

# frozen_string_literal: true

# Logs that help: one line per handler failure (its backtrace at DEBUG), every line with the
# progname "prosody", and each librdkafka error once.
RSpec.describe "Logging" do
  let(:topic) { unique("logging") }

  it "writes one line per failed attempt, with the failure and where it was raised; the backtrace at DEBUG" do
    handler = SpecHelpers::RecordingHandler.new { |_c, m| raise IOError, "downstream is down" if m.payload == "bad" }
    client = start(handler, mode: :best_effort)
    client.send_message(topic, "k", "bad")
    client.send_message(topic, "k", "good")
    wait_for(message: "the second message") { handler.payloads.include?("good") }
    lines = wait_for(message: "the failure line") do
      l = log_output.lines
      l if l.any? { |line| line.include?("downstream is down") }
    end
    failure_lines = lines.select { |line| line.include?("downstream is down") }
    expect(failure_lines.size).to eq(1)
    expect(failure_lines.first).to match(/ERROR -- prosody: .*message topic=#{topic} .*key="k" failed/)
    expect(failure_lines.first).to match(/\(attempt 1, transient IOError: downstream is down \(at .*logging_spec\.rb/)
    expect(lines.grep_v(/^\s/)).to all(match(/ -- prosody: /))

    Prosody.logger = Logger.new(@log_io, level: Logger::DEBUG)
    client.send_message(topic, "k", "bad")
    backtrace = /DEBUG -- prosody: handler failed .*IOError: downstream is down\n\s+\S*logging_spec\.rb/
    wait_for(message: "the backtrace at DEBUG") { log_output.match?(backtrace) }
  end

  it "reports each librdkafka error once" do
    # Producers are shared per process by servers and send_timeout, and a producer reports its
    # connection failure once: an address no other example uses gives this example a new one.
    client = Prosody::Client.new(bootstrap_servers: "127.0.0.9:1", send_timeout: 0.5)
    expect { client.send_message("nowhere", "k", 1) }.to raise_error(Prosody::SendError)
    lines = wait_for(message: "librdkafka's connection failure") do
      l = log_output.lines
      l if l.any? { |line| line.include?("[librdkafka]") && line.include?("127.0.0.9:1") }
    end
    expect(lines.grep(/Global error|rdkafka::client/)).to be_empty
  end
end

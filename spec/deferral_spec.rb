# frozen_string_literal: true

require "json"

# Deferred retry in pipeline mode, in mock mode: a failing key is set aside so its partition moves
# on, its messages are re-read from the mock cluster and retried in order, and the commit
# position passes it.
RSpec.describe "deferred retry (pipeline mode, mock)" do
  let(:topic) { unique("defer-topic") }
  let(:group) { unique("group") }
  let(:dlq) { unique("dlq") }

  # One partition, so every key shares it; fast deferred retries unless an example says otherwise.
  def start(handler, **options)
    super(handler, group:, mock_partitions: 1, defer_base: 0.05, defer_max_delay: 0.2,
                   retry_base: 0.005, max_retry_delay: 0.05, **options)
  end

  def send_all(client, pairs)
    pairs.each { |key, payload| client.send_message(topic, key, payload) }
  end

  it "handles the other keys while one key fails, runs the key's messages in order afterwards, and commits past it" do
    failing = ["bad"]
    handler = SwitchHandler.new(failing)
    client = start(handler)
    others = (0...300).map { |i| ["k#{i % 50}", { "n" => i }] }
    bad = (1..5).map { |i| ["bad", { "bad" => i }] }
    # The failing key's messages come first and are spread among the others.
    send_all(client, [bad[0]] + others[0, 100] + [bad[1]] + others[100, 100] + bad[2, 2] + others[200, 100] + [bad[4]])
    wait_for(message: "the 300 messages of the other keys") { handler.succeeded.size >= 300 }
    expect(handler.succeeded("bad")).to be_empty
    expect(handler.count("bad")).to be >= 1
    expect(handler.calls.map { |k, p, _| p if k == "bad" }.compact.uniq).to eq([{ "bad" => 1 }])
    expect(log_output).to include("deferring its key")

    failing.clear
    wait_for(message: "the failing key's five messages") { handler.succeeded("bad").size >= 5 }
    expect(handler.succeeded("bad")).to eq((1..5).map { |i| { "bad" => i } })
    expect(handler.succeeded.size).to eq(305)
    wait_for(message: "the key to leave deferral") { log_output.include?("no deferred messages left") }
  end

  it "hands a deferred key's pending work to the group's next client, and nothing else twice" do
    failing = ["bad"]
    first = SwitchHandler.new(failing)
    client = start(first)
    send_all(client, [["bad", { "bad" => 1 }]] + (0...50).map { |i| ["k#{i % 10}", { "n" => i }] } +
                     [["bad", { "bad" => 2 }]] + [["k0", { "last" => true }]])
    wait_for(message: "the other keys") { first.succeeded.size >= 51 }
    # Unsubscribing drains: the deferred key's later message is stored in its list, then every
    # offset commits.
    client.unsubscribe

    second = SwitchHandler.new([])
    client = start(second)
    wait_for(message: "the deferred key's two messages") { second.succeeded("bad").size >= 2 }
    client.send_message(topic, "marker", { "marker" => true })
    wait_for(message: "a marker sent after everything else") { second.succeeded("marker").any? }
    expect(second.succeeded("bad")).to eq([{ "bad" => 1 }, { "bad" => 2 }])
    expect(second.calls.map(&:first).uniq.sort).to eq(%w[bad marker])
  end

  it "does not defer while most calls fail: new failures retry in place, and drain after recovery" do
    failing = (0...30).map { |i| "storm#{i}" }
    handler = SwitchHandler.new(failing)
    client = start(handler, defer_base: 60, defer_max_delay: 60, defer_failure_threshold: 0.5)
    send_all(client, failing.map { |key| [key, { "k" => key }] })
    # Deferred keys wait a minute; keys retried in place run again within milliseconds.
    wait_for(message: "keys retried in place") { failing.count { |key| handler.count(key) >= 3 } >= 15 }
    deferred = failing.select { |key| handler.count(key) == 1 }
    expect(deferred.size).to be <= 10 # deferred before the rate had enough calls to be trusted

    failing.clear
    in_place = (0...30).map { |i| "storm#{i}" } - deferred
    wait_for(message: "the keys retried in place") { in_place.all? { |key| handler.succeeded(key).size == 1 } }
    expect(deferred.sum { |key| handler.succeeded(key).size }).to eq(0)
  end

  describe "defer_max_retries (the poison cap)" do
    it "skips a message after that many failed deferred retries and logs it, without failure_topic" do
      handler = SwitchHandler.new(["poison"])
      client = start(handler, defer_max_retries: 2)
      client.send_message(topic, "poison", { "n" => 1 })
      wait_for(message: "the poison message given up") { log_output.include?("past defer_max_retries") }
      handler.failing.clear
      client.send_message(topic, "poison", { "n" => 2 })
      wait_for(message: "the key's next message") { handler.succeeded("poison") == [{ "n" => 2 }] }
      expect(handler.calls.count { |_, p, _| p == { "n" => 1 } }).to eq(3) # first call + 2 retries
      expect(log_output).to include("skipping it")
    end

    it "dead-letters it with failure_topic" do
      handler = SwitchHandler.new(["poison"])
      client = start(handler, defer_max_retries: 1, failure_topic: dlq)
      client.send_message(topic, "poison", { "n" => 1 })
      records = []
      wait_for(message: "the dead letter") do
        records = Prosody::Native.mock_read_topic(dlq, 1, 0.2)
        records.any?
      end
      expect(JSON.parse(records.first["payload"])).to eq("n" => 1)
      expect(records.first["headers"].to_h).to include("prosody-dlq-reason" => "retries_exhausted",
                                                       "prosody-dlq-attempts" => "2")
      expect(handler.count("poison")).to eq(2)
    end
  end

  it "retries in place when defer_enabled is false (the key holds its partition's commit)" do
    handler = SwitchHandler.new(["bad"])
    client = start(handler, defer_enabled: false)
    client.send_message(topic, "bad", { "n" => 1 })
    wait_for(message: "in-place retries") { handler.count("bad") >= 5 }
    expect(log_output).not_to include("deferring its key")
  end
end

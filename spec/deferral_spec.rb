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

  it "rejects a key that monopolizes handler time before its handler runs, defers it, and runs it later in order" do
    hot = Class.new(SwitchHandler) do
      def on_message(context, message)
        sleep 0.15 if message.key == "hot"
        super
      end
    end.new([])
    client = start(hot, monopolization_window: 1.0, monopolization_threshold: 0.25, defer_base: 0.1,
                        defer_max_delay: 0.5)
    send_all(client, (1..8).map { |i| ["hot", { "n" => i }] } + (1..20).map { |i| ["cold#{i % 4}", { "n" => i }] })
    wait_for(message: "every message") { hot.succeeded.size >= 28 }
    expect(hot.succeeded("hot")).to eq((1..8).map { |i| { "n" => i } })
    output = log_output
    expect(output).to include("of handler time (monopolization_threshold 25%)")
    expect(output).to include("Prosody::MonopolizationError")
    expect(output.scan("monopolization_threshold 25%").size).to be <= 3 # once per key per window
  end

  it "does not reject anyone with monopolization_enabled false" do
    hot = Class.new(SwitchHandler) do
      def on_message(context, message)
        sleep 0.15 if message.key == "hot"
        super
      end
    end.new([])
    client = start(hot, monopolization_enabled: false, monopolization_window: 1.0, monopolization_threshold: 0.25)
    send_all(client, (1..8).map { |i| ["hot", { "n" => i }] })
    wait_for(message: "every message") { hot.succeeded.size >= 8 }
    expect(log_output).not_to include("MonopolizationError")
  end

  it "defers a failing timer: the key's messages go on, its later timers wait behind it" do
    events = Queue.new
    fail_first = 2
    first_timer = nil
    handler = Class.new(Prosody::EventHandler) do
      define_method(:on_message) do |context, message|
        events << [:message, message.payload]
        next unless message.payload == "schedule"

        base = Time.now.to_i + 1
        first_timer = base
        context.schedule(Time.at(base))
        context.schedule(Time.at(base + 1))
      end
      define_method(:on_timer) do |_context, timer|
        if timer.time.to_i == first_timer && fail_first.positive?
          fail_first -= 1
          events << [:timer_failed, timer.time.to_i]
          raise "flaky downstream"
        end
        events << [:timer, timer.time.to_i]
      end
    end.new
    client = start(handler, defer_base: 1.5, defer_max_delay: 1.5)
    client.send_message(topic, "k", "schedule")
    seen = []
    wait_for(timeout: 15, message: "the first timer failing") do
      seen << events.pop until events.empty?
      seen.any? { |e| e.first == :timer_failed }
    end
    # While the timer waits for its deferred retry, the key's messages run.
    client.send_message(topic, "k", "meanwhile")
    wait_for(timeout: 15, message: "both timers") do
      seen << events.pop until events.empty?
      seen.count { |e| e.first == :timer } == 2
    end
    kinds = seen.map { |e| e.first == :message ? e.last : e.first }
    first_success = kinds.index(:timer)
    expect(kinds.index("meanwhile")).to be < first_success
    expect(kinds.count(:timer_failed)).to eq(2)
    timers = seen.select { |e| e.first == :timer }.map(&:last)
    expect(timers).to eq(timers.sort) # the later timer waited for the deferred one
    expect(log_output).to include("deferring it (the key's later timers wait)")
  end

  it "retries in place when defer_enabled is false (the key holds its partition's commit)" do
    handler = SwitchHandler.new(["bad"])
    client = start(handler, defer_enabled: false, stall_threshold: 0.3)
    client.send_message(topic, "bad", { "n" => 1 })
    wait_for(message: "in-place retries") { handler.count("bad") >= 5 }
    wait_for(message: "the partition to stall") { client.is_stalled? }
    expect(log_output).not_to include("deferring its key")
  end

  it "does not stall the partition while a key is deferred" do
    handler = SwitchHandler.new(["bad"])
    client = start(handler, stall_threshold: 0.3, defer_base: 5, defer_max_delay: 5)
    client.send_message(topic, "bad", { "n" => 1 })
    client.send_message(topic, "good", { "n" => 2 })
    wait_for(message: "the other key") { handler.succeeded("good").any? }
    sleep 0.6 # twice stall_threshold: a held offset would read as stalled by now
    expect(client.is_stalled?).to be(false)
    expect(handler.count("bad")).to eq(1)
  end
end

# frozen_string_literal: true

require "prosody/testing"

# Deduplication by message id in mock mode: the README's examples, the cache and the (memory)
# store, what marks an id handled, and the options in both their forms.
RSpec.describe "deduplication by message id (mock)" do
  let(:topic) { unique("dedup-topic") }
  let(:group) { unique("group") }

  def start(handler, **options)
    super(handler, group:, mock_partitions: 1, retry_base: 0.005, max_retry_delay: 0.05,
                   defer_base: 0.05, defer_max_delay: 0.2, **options)
  end

  # Sends a marker without an id on each of +keys+ and waits until +handler+ ran them: everything
  # sent before on those keys was handled or skipped by then (a key's messages run in order).
  def settle(client, handler, keys = ["k"])
    markers = keys.to_h { |key| [key, { "marker" => unique("m") }] }
    markers.each { |key, marker| client.send_message(topic, key, marker) }
    wait_for(message: "the markers") { markers.all? { |key, marker| handler.succeeded(key).include?(marker) } }
  end

  # What +handler+ ran successfully for +key+, markers left out.
  def handled(handler, key = "k")
    handler.succeeded(key).reject { |payload| payload.is_a?(Hash) && payload.key?("marker") }
  end

  def with_env(vars)
    vars.each { |k, v| ENV[k] = v }
    yield
  ensure
    vars.each_key { |k| ENV.delete(k) }
  end

  context "on the README's topic" do
    # No other spec of this process uses "my-topic".
    let(:topic) { "my-topic" }

    it "runs the README's example: the same id twice on key1 is handled once, on key2 again" do
      handler = SwitchHandler.new([])
      client = start(handler)
      # The README's sample, verbatim.
      client.send_message("my-topic", "key1", {
                            id: "msg-123", # Message will be processed
                            content: "Hello!"
                          })

      client.send_message("my-topic", "key1", {
                            id: "msg-123", # Message will be skipped (duplicate)
                            content: "Hello again!"
                          })

      client.send_message("my-topic", "key2", {
                            id: "msg-123", # Message will be processed (different key)
                            content: "Hello!"
                          })
      settle(client, handler, %w[key1 key2])
      expect(handled(handler, "key1")).to eq([{ "id" => "msg-123", "content" => "Hello!" }])
      expect(handled(handler, "key2")).to eq([{ "id" => "msg-123", "content" => "Hello!" }])
      expect(client.skipped_events).to eq(source_system: 0, filtered: 0, duplicate: 1)
    end
  end

  it "always handles messages without an id, and tells a String id from an Integer one" do
    handler = SwitchHandler.new([])
    client = start(handler)
    [{ "n" => 1 }, { "n" => 1 }, { "id" => 7 }, { "id" => "7" }, { "id" => 7 }, { "id" => 1.5 },
     { "id" => 1.5 }, { "id" => nil }, { "id" => nil }].each { |payload| client.send_message(topic, "k", payload) }
    client.send_message(topic, "k", [1, 2])
    client.send_message(topic, "k", [1, 2])
    settle(client, handler)
    expect(handled(handler)).to eq([{ "n" => 1 }, { "n" => 1 }, { "id" => 7 }, { "id" => "7" },
                                    { "id" => 1.5 }, { "id" => 1.5 }, { "id" => nil }, { "id" => nil },
                                    [1, 2], [1, 2]])
    expect(client.skipped_events[:duplicate]).to eq(1)
  end

  # Subscribes a new client of the group (with +options+), sends messages with +ids+ on key "k",
  # waits until each was handled or skipped, unsubscribes, and returns the ids the handler ran.
  def handle_ids(ids, **options)
    handler = SwitchHandler.new([])
    client = start(handler, **options)
    ids.each { |id| client.send_message(topic, "k", { "id" => id }) }
    settle(client, handler)
    client.unsubscribe
    handled(handler).map { |payload| payload["id"] }
  end

  it "skips an id an earlier client of the group handled (the store outlives the cache), with a one-entry cache" do
    # Twice more after the first three, when the one-entry cache holds only "c".
    expect(handle_ids(%w[a b c] * 3, idempotence_cache_size: 1)).to eq(%w[a b c])
    expect(handle_ids(%w[a d])).to eq(%w[d])
  end

  it "turns off entirely with idempotence_cache_size: 0 (nothing recorded either), as the option or its variable" do
    expect(handle_ids(%w[x x], idempotence_cache_size: 0)).to eq(%w[x x])
    # Nothing was recorded: a client with deduplication on handles "x" once more, then skips it.
    expect(handle_ids(%w[x x])).to eq(%w[x])
    with_env("PROSODY_IDEMPOTENCE_CACHE_SIZE" => "0") do
      expect(handle_ids(%w[x])).to eq(%w[x])
    end
  end

  it "forgets every earlier record when idempotence_version changes, as the option or its variable" do
    expect(handle_ids(%w[x])).to eq(%w[x])
    expect(handle_ids(%w[x x], idempotence_version: "2")).to eq(%w[x])
    with_env("PROSODY_IDEMPOTENCE_VERSION" => "3") do
      expect(handle_ids(%w[x x])).to eq(%w[x])
    end
    # Version "1" again: its record is still there.
    expect(handle_ids(%w[x])).to be_empty
  end

  it "records an id whose handler failed permanently: its duplicate is skipped, not dead-lettered" do
    dlq = unique("dlq")
    handler = StrictHandler.new([])
    client = start(handler, failure_topic: dlq)
    client.send_message(topic, "k", { "id" => "x", "bad" => true })
    client.send_message(topic, "k", { "id" => "x", "bad" => true })
    settle(client, handler)
    expect(handler.calls.count { |k, p, _| k == "k" && p["bad"] }).to eq(1)
    expect(client.skipped_events[:duplicate]).to eq(1)
    Prosody::Testing.wait_until_handled(client)
    expect(Prosody::Testing.records(dlq).size).to eq(1)
  end

  it "records a permanent failure only once its dead letter is acknowledged (a redelivery before that is handled)" do
    dlq = unique("dlq")
    Prosody::Native.mock_create_topic(dlq, 1)
    Prosody::Native.mock_fail_topic(dlq, true)
    first = StrictHandler.new([])
    client = start(first, failure_topic: dlq, send_timeout: 0.5, shutdown_timeout: 0.5)
    client.send_message(topic, "k", { "id" => "x", "bad" => true })
    wait_for(message: "a failed dead-letter send") do
      log_output[/could not send topic=#{topic} .*to the failure topic/]
    end
    # The dead letter never got through: the offset stays uncommitted, and the id unrecorded.
    client.unsubscribe
    Prosody::Native.mock_fail_topic(dlq, false)

    second = StrictHandler.new([])
    client = start(second, failure_topic: dlq)
    settle(client, second)
    expect(second.calls.count { |k, p, _| k == "k" && p["bad"] }).to eq(1)
    wait_for(message: "the dead letter") { Prosody::Native.mock_read_topic(dlq, 1, 0.2).size == 1 }
    expect(client.skipped_events[:duplicate]).to eq(0)
  ensure
    Prosody::Native.mock_fail_topic(dlq, false)
  end

  it "does not record an id whose handler failed transiently: the next copy is handled" do
    handler = SwitchHandler.new(["k"])
    client = start(handler, mode: :best_effort, max_retries: 0)
    client.send_message(topic, "k", { "id" => "x" })
    wait_for(message: "the failed attempt") { handler.count("k") == 1 }
    handler.failing.clear
    client.send_message(topic, "k", { "id" => "x" })
    client.send_message(topic, "k", { "id" => "x" })
    settle(client, handler)
    expect(handler.calls.select { |k, p, _| k == "k" && p["id"] }.map(&:last)).to eq(%i[failed ok])
    expect(client.skipped_events[:duplicate]).to eq(1)
  end

  it "skips a duplicate that waited in a deferred key's list once its first copy succeeded" do
    debug_logging!
    handler = SwitchHandler.new(["k"])
    client = start(handler)
    client.send_message(topic, "k", { "id" => "x", "seq" => 1 })
    wait_for(message: "the key to be deferred") { log_output.include?("deferring its key") }
    client.send_message(topic, "k", { "id" => "x", "seq" => 2 })
    client.send_message(topic, "k", { "id" => "y", "seq" => 3 })
    wait_for(message: "both to join the deferred list") do
      log_output.scan("joins its key's deferred messages").size >= 2
    end
    handler.failing.clear
    wait_for(message: "the key's last message") { handler.succeeded("k").any? { |p| p["seq"] == 3 } }
    settle(client, handler)
    expect(handled(handler).map { |p| p["seq"] }).to eq([1, 3])
    expect(client.skipped_events[:duplicate]).to eq(1)
    wait_for(message: "the key to leave deferral") { log_output.include?("no deferred messages left") }
  end

  it "honours idempotence_ttl" do
    handler = SwitchHandler.new([])
    client = start(handler, idempotence_ttl: 1)
    client.send_message(topic, "k", { "id" => "x" })
    client.send_message(topic, "k", { "id" => "x" })
    settle(client, handler)
    handled_at = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    expect(handled(handler).size).to eq(1)
    # The record's lifetime is what this example is about: let it pass.
    sleep 1.2 - (Process.clock_gettime(Process::CLOCK_MONOTONIC) - handled_at)
    client.send_message(topic, "k", { "id" => "x" })
    settle(client, handler)
    expect(handled(handler).size).to eq(2)
  end

  it "refuses an idempotence_ttl out of range, naming it" do
    expect { Prosody::Client.new(mock: true, idempotence_ttl: 0) }
      .to raise_error(ArgumentError, /invalid :idempotence_ttl, expected a duration from 1 second to 20 years/)
    expect { Prosody::Client.new(mock: true, idempotence_cache_size: -1) }
      .to raise_error(ArgumentError, /invalid :idempotence_cache_size/)
    with_env("PROSODY_IDEMPOTENCE_TTL" => "500ms") do
      expect { Prosody::Client.new(mock: true) }
        .to raise_error(ArgumentError, /invalid PROSODY_IDEMPOTENCE_TTL, expected a duration from 1 second to 20 years/)
    end
  end

  it "reads PROSODY_IDEMPOTENCE_TTL" do
    with_env("PROSODY_IDEMPOTENCE_TTL" => "1s") do
      expect(handle_ids(%w[x x])).to eq(%w[x])
      # The record's lifetime is what this example is about: let it pass.
      sleep 1.1
      expect(handle_ids(%w[x])).to eq(%w[x])
    end
  end
end

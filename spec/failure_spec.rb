# frozen_string_literal: true

require "json"

# Failure handling in mock mode: retries, the three modes, the dead-letter topic, error
# classification, timeouts and cancellation, quarantine, stall detection.
RSpec.describe "failure handling in mock mode" do
  let(:topic) { unique("fail-topic") }
  let(:dlq) { unique("dlq") }

  # Fast retries (in place and deferred) unless an example says otherwise.
  def start(handler, **options)
    super(handler, retry_base: 0.005, max_retry_delay: 0.05, defer_base: 0.005, defer_max_delay: 0.05, **options)
  end

  def dead_letters(count, timeout: 10)
    records = []
    wait_for(timeout:, message: "#{count} dead letter(s) on #{dlq}") do
      records = Prosody::Native.mock_read_topic(dlq, count, 0.2)
      records.size >= count
    end
    records
  end

  def headers_of(record)
    record["headers"].to_h
  end

  # What a handler that ignores cancellation does: sleeps in short steps, swallowing
  # Async::Stop, until the block is true.
  def sleep_ignoring_cancellation
    until yield
      begin
        sleep 0.05
      rescue Async::Stop
        nil
      end
    end
  end

  describe "pipeline mode (the default)" do
    it "retries a transient failure until it succeeds, blocking only its key" do
      handler = FlakyHandler.new(failures: 3)
      client = start(handler)
      client.send_message(topic, "flaky", "first")
      client.send_message(topic, "flaky", "second")
      client.send_message(topic, "other", "x")
      wait_for(message: "both messages of the flaky key") { handler.calls["flaky"].include?("second") }
      # Tried 4 times (3 failures, then success), then the next message of the key; never skipped.
      expect(handler.calls["flaky"]).to eq(%w[first first first first second])
      expect(handler.calls["other"].first).to eq("x")
    end

    it "retries transient failures past max_retries: only success moves the key on" do
      handler = FlakyHandler.new(failures: 6)
      client = start(handler, max_retries: 1)
      client.send_message(topic, "k", "only")
      wait_for(message: "the seventh attempt") { handler.count("k") == 7 }
      sleep 0.2
      expect(handler.count("k")).to eq(7)
    end

    it "does not retry a permanent failure: logs it, dead-letters it when failure_topic is set, commits" do
      strict = Class.new(FlakyHandler) { permanent :on_message, TypeError }
      handler = strict.new(failures: 1, error: -> { TypeError.new("wrong type") })
      client = start(handler, failure_topic: dlq)
      client.send_message(topic, "k", { "n" => 1 })
      client.send_message(topic, "k", { "n" => 2 })
      wait_for(message: "the second message") { handler.count("k") == 2 }
      expect(handler.calls["k"]).to eq([{ "n" => 1 }, { "n" => 2 }])
      record = dead_letters(1).first
      expect(record["key"]).to eq("k")
      expect(JSON.parse(record["payload"])).to eq("n" => 1)
      expect(headers_of(record)).to include("prosody-dlq-reason" => "permanent",
                                            "prosody-dlq-error-class" => "TypeError",
                                            "prosody-dlq-attempts" => "1")
    end

    it "logs and commits a permanent failure when no failure_topic is set" do
      handler = FlakyHandler.new(failures: 1, error: -> { Prosody::PermanentError.new("never works") })
      client = start(handler)
      client.send_message(topic, "k", 1)
      client.send_message(topic, "k", 2)
      wait_for(message: "the second message") { handler.count("k") == 2 }
      expect(handler.calls["k"]).to eq([1, 2])
      giving_up = /offset=0 key="k" failed \(attempt 1, permanent Prosody::PermanentError: never works \(at .+; giving/
      expect(wait_for { log_output[giving_up] }).to be_truthy
    end
  end

  describe "low_latency mode" do
    it "requires failure_topic, naming it" do
      expect { mock_client(topic, mode: :low_latency) }
        .to raise_error(ArgumentError, /missing :failure_topic.*low_latency.*PROSODY_FAILURE_TOPIC/)
    end

    it "tries a transient failure max_retries + 1 times, then dead-letters it with full context" do
      handler = FlakyHandler.new(error: -> { Prosody::TransientError.new("still down") })
      client = start(handler, mode: :low_latency, failure_topic: dlq, max_retries: 2, group: "dlq-group")
      client.send_message(topic, "order-7", { "total" => 12.5 }, headers: { "trace" => "abc", "empty" => "" })
      record = dead_letters(1).first
      expect(handler.count("order-7")).to eq(3)
      sleep 0.2
      expect(handler.count("order-7")).to eq(3)

      expect(record["key"]).to eq("order-7")
      expect(record["payload"]).to eq(JSON.generate("total" => 12.5))
      headers = headers_of(record)
      expect(headers).to include(
        "trace" => "abc", "empty" => "",
        "prosody-dlq-source-system" => "spec-producer",
        "prosody-dlq-source-topic" => topic,
        "prosody-dlq-source-partition" => match(/\A[0-3]\z/),
        "prosody-dlq-source-offset" => "0",
        "prosody-dlq-consumer-group" => "dlq-group",
        "prosody-dlq-reason" => "retries_exhausted",
        "prosody-dlq-error-class" => "Prosody::TransientError",
        "prosody-dlq-error-message" => "still down",
        "prosody-dlq-attempts" => "3",
        "source-system" => "spec-producer"
      )
      expect(Integer(headers["prosody-dlq-source-timestamp"])).to be_within(60_000).of((Time.now.to_f * 1000).to_i)
      expect(headers["prosody-dlq-error-backtrace"]).to include("flaky_handler.rb")
    end

    it "dead-letters a permanent failure at once and moves on to the key's next message" do
      handler = FlakyHandler.new(failures: 1, error: -> { Prosody::PermanentError.new("bad data") })
      client = start(handler, mode: :low_latency, failure_topic: dlq)
      client.send_message(topic, "k", "bad")
      client.send_message(topic, "k", "good")
      wait_for(message: "the next message") { handler.count("k") == 2 }
      expect(handler.calls["k"]).to eq(%w[bad good])
      expect(headers_of(dead_letters(1).first))
        .to include("prosody-dlq-reason" => "permanent", "prosody-dlq-attempts" => "1")
    end

    it "retries the dead-letter send when it fails, and never drops the record" do
      Prosody::Native.mock_create_topic(dlq, 1)
      Prosody::Native.mock_fail_topic(dlq, true)
      handler = FlakyHandler.new(error: -> { Prosody::PermanentError.new("bad") })
      start(handler, mode: :low_latency, failure_topic: dlq, send_timeout: 0.5)
      sender = mock_client(topic)
      sender.send_message(topic, "k", "poison")
      sender.send_message(topic, "k", "next")
      wait_for(message: "a failed dead-letter send") do
        log_output[/could not send topic=#{topic} .*to the failure topic/]
      end
      sleep 0.5
      expect(handler.calls["k"]).to eq(%w[poison]) # the key waits for its dead letter
      Prosody::Native.mock_fail_topic(dlq, false)
      wait_for(message: "the next message") { handler.count("k") == 2 }
      expect(dead_letters(1).map { |r| r["payload"] }).to eq(['"poison"'])
    ensure
      Prosody::Native.mock_fail_topic(dlq, false)
    end
  end

  describe "best_effort mode" do
    it "logs the failure with the exception and commits, without retrying" do
      handler = FlakyHandler.new(failures: 1)
      client = start(handler, mode: :best_effort, failure_topic: dlq)
      client.send_message(topic, "k", "a")
      client.send_message(topic, "k", "b")
      wait_for(message: "the second message") { handler.count("k") == 2 }
      sleep 0.2
      expect(handler.calls["k"]).to eq(%w[a b])
      expect(log_output).to match(/message topic=#{topic} .*key="k" failed \(attempt 1, transient RuntimeError: flaky/)
      expect(log_output).to match(%r{\(at [^)]*spec/support/flaky_handler\.rb:\d+})
      expect(Prosody::Native.mock_read_topic(dlq, 1, 0.3)).to be_empty
    end
  end

  describe "undecodable payloads" do
    %i[pipeline best_effort].each do |mode|
      it "go to failure_topic with their raw bytes and the reason (#{mode})" do
        Prosody::Native.mock_create_topic(topic, 1)
        producer = raw_producer
        producer.produce(topic, 0, "k", "{not json", { "h" => "v" })
        producer.produce(topic, 0, "k", JSON.generate("ok" => true), {})
        producer.flush(10)
        handler = FlakyHandler.new(failures: 0)
        start(handler, mode:, failure_topic: dlq)
        wait_for(message: "the good record") { handler.count("k") == 1 }
        record = dead_letters(1).first
        expect(record["payload"]).to eq("{not json")
        expect(headers_of(record)).to include("h" => "v", "prosody-dlq-reason" => "undecodable",
                                              "prosody-dlq-error-class" => "Prosody::UndecodablePayload",
                                              "prosody-dlq-source-offset" => "0")
        expect(headers_of(record)["prosody-dlq-error-message"]).to match(/not valid JSON/)
      end
    end
  end

  describe "error classification" do
    let(:base) do
      Class.new(Prosody::EventHandler) do
        def on_message(_context, _message); end

        permanent :on_message, TypeError, NoMethodError
        transient :on_message, JSON::ParserError
      end
    end

    it "classifies by the macros, declared before or after def, most specific class first" do
      expect(base.failure_kind(:on_message, TypeError.new)).to eq(:permanent)
      expect(base.failure_kind(:on_message, NoMethodError.new)).to eq(:permanent)
      expect(base.failure_kind(:on_message, JSON::ParserError.new)).to eq(:transient)
      expect(base.failure_kind(:on_message, RuntimeError.new)).to eq(:transient)
      expect(base.failure_kind(:on_timer, TypeError.new)).to eq(:transient)
      narrow = Class.new(Prosody::EventHandler) do
        permanent :on_message, StandardError
        transient :on_message, IOError
      end
      expect(narrow.failure_kind(:on_message, EOFError.new)).to eq(:transient)
      expect(narrow.failure_kind(:on_message, ArgumentError.new)).to eq(:permanent)
    end

    it "is inherited, and a subclass can override it without changing its parent" do
      child = Class.new(base) { transient :on_message, TypeError }
      grandchild = Class.new(child)
      expect(grandchild.failure_kind(:on_message, TypeError.new)).to eq(:transient)
      expect(grandchild.failure_kind(:on_message, NoMethodError.new)).to eq(:permanent)
      expect(base.failure_kind(:on_message, TypeError.new)).to eq(:permanent)
    end

    it "lets Prosody::PermanentError and Prosody::TransientError be raised directly" do
      expect(base.failure_kind(:on_message, Prosody::PermanentError.new)).to eq(:permanent)
      expect(Class.new(base) { permanent :on_message, Prosody::TransientError }
        .failure_kind(:on_message, Prosody::TransientError.new)).to eq(:transient)
    end

    it "rejects a bad method name or a non-exception class, naming it" do
      expect { Class.new(Prosody::EventHandler) { permanent :on_mesage, TypeError } }
        .to raise_error(ArgumentError, /:on_message or :on_timer.*:on_mesage/)
      expect { Class.new(Prosody::EventHandler) { transient :on_message, "TypeError" } }
        .to raise_error(ArgumentError, /expects exception classes, got "TypeError"/)
      expect { Class.new(Prosody::EventHandler) { permanent :on_message } }
        .to raise_error(ArgumentError, /at least one exception class/)
    end

    it "applies end to end: a subclass's permanent error is tried once, its parent's transient one retried" do
      parent = Class.new(FlakyHandler) { transient :on_message, KeyError }
      child = Class.new(parent) { permanent :on_message, KeyError }
      handler = child.new(failures: 5, error: -> { KeyError.new("missing") })
      client = start(handler, mode: :low_latency, failure_topic: dlq, max_retries: 3)
      client.send_message(topic, "k", 1)
      record = dead_letters(1).first
      expect(handler.count("k")).to eq(1)
      expect(headers_of(record))
        .to include("prosody-dlq-error-class" => "KeyError", "prosody-dlq-reason" => "permanent")
    end
  end

  describe "timeout and cancellation" do
    it "cancels a handler past its timeout: on_cancel returns, should_cancel? is true, Async::Stop follows" do
      observed = Queue.new
      handler = FlakyHandler.new(failures: 0) do |context, _message, attempts|
        next unless attempts == 1

        context.on_cancel
        observed << [:on_cancel_returned, context.should_cancel?]
        begin
          sleep 5
          observed << :slept
        rescue Async::Stop
          observed << :stopped
          raise
        end
      end
      client = start(handler, timeout: 0.3)
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      client.send_message(topic, "k", "slow")
      expect(observed.pop).to eq([:on_cancel_returned, true])
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be_between(0.25, 3)
      expect(observed.pop).to eq(:stopped)
      # Re-raising Async::Stop is a transient failure: pipeline mode runs it again.
      wait_for(message: "the retry") { handler.count("k") == 2 }
      expect(log_output).to match(/exceeded its timeout/)
    end

    it "counts a handler that rescues Async::Stop and returns as a success" do
      handler = FlakyHandler.new(failures: 0) do |_context, _message, _attempts|
        sleep 5
      rescue Async::Stop
        nil
      end
      client = start(handler, timeout: 0.2)
      client.send_message(topic, "k", 1)
      client.send_message(topic, "k", 2)
      wait_for(message: "the next message") { handler.count("k") == 2 }
      expect(handler.calls["k"]).to eq([1, 2])
    end

    it "defaults the timeout to 80% of stall_threshold" do
      handler = FlakyHandler.new(failures: 0) do |context, _message, attempts|
        sleep 5 if attempts == 1 && !context.should_cancel?
      rescue Async::Stop
        nil
      end
      client = start(handler, stall_threshold: 0.5)
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      client.send_message(topic, "k", 1)
      client.send_message(topic, "k", 2)
      wait_for(message: "the next message") { handler.count("k") == 2 }
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be_between(0.35, 3)
    end

    it "lets handlers finish during shutdown, and cancels only near the end of shutdown_timeout" do
      events = Queue.new
      handler = FlakyHandler.new(failures: 0) do |context, message, _attempts|
        events << :started
        sleep message.payload
        events << [:finished, context.should_cancel?]
      rescue Async::Stop
        events << :stopped
        raise
      end
      client = start(handler, shutdown_timeout: 2)
      client.send_message(topic, "quick", 0.8)
      client.send_message(topic, "slow", 10)
      2.times { expect(events.pop).to eq(:started) }
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      client.unsubscribe
      elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
      outcomes = [events.pop, events.pop]
      # The 0.8 s handler finished uncancelled; the 10 s one was stopped at ~90% of 2 s.
      expect(outcomes).to contain_exactly([:finished, false], :stopped)
      expect(elapsed).to be_between(1.7, 2.6)
    end

    it "unsubscribes even when every permit is held by handlers that ignore cancellation past shutdown_timeout" do
      started = Queue.new
      handler = FlakyHandler.new(failures: 0) do |_context, _message, _attempts|
        started << true
        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 1.5
        sleep_ignoring_cancellation { Process.clock_gettime(Process::CLOCK_MONOTONIC) >= deadline }
      end
      client = start(handler, max_concurrency: 1, shutdown_timeout: 0.5)
      client.send_message(topic, "k", 1)
      started.pop
      began = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      Timeout.timeout(10) { client.unsubscribe }
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - began).to be < 5
      expect(client.consumer_state).to eq(:configured)
    end

    it "quarantines a handler that ignores cancellation: its permit goes to other keys, its key waits" do
      release = Queue.new
      handler = FlakyHandler.new(failures: 0) do |_context, message, attempts|
        next unless message.key == "stubborn" && attempts == 1

        sleep_ignoring_cancellation { !release.empty? }
      end
      client = start(handler, timeout: 0.2, max_concurrency: 1)
      client.send_message(topic, "stubborn", "a")
      client.send_message(topic, "stubborn", "b")
      wait_for(message: "the stubborn handler") { handler.count("stubborn") == 1 }
      client.send_message(topic, "other", "x")
      # timeout 0.2 s + grace 1 s: then the single permit is released to the other key.
      wait_for(timeout: 5, message: "the other key") { handler.count("other") == 1 }
      expect(log_output).to match(/key="stubborn" ignored its cancellation.*key stays blocked/)
      expect(handler.calls["stubborn"]).to eq(%w[a]) # still blocked
      release << true
      # It really returned: the event counts as a transient failure and is retried, then "b".
      wait_for(message: "the retry and the next message") { handler.count("stubborn") == 3 }
      expect(handler.calls["stubborn"]).to eq(%w[a a b])
      expect(log_output).to match(/Prosody::HandlerQuarantined/)
    end

    it "treats a CPU loop that never yields the same way once it returns" do
      handler = FlakyHandler.new(failures: 0) do |context, _message, attempts|
        next unless attempts == 1

        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 2.5
        nil while Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline # ignores should_cancel?
        raise "unexpected" unless context.should_cancel?
      end
      client = start(handler, timeout: 0.2)
      client.send_message(topic, "cpu", 1)
      wait_for(message: "the retry") { handler.count("cpu") == 2 }
      expect(log_output).to match(/key="cpu" ignored its cancellation/)
      expect(log_output).to match(/cpu.*Prosody::HandlerQuarantined/)
    end
  end

  describe "stall detection" do
    it "reports is_stalled? while a message waits longer than stall_threshold, and recovers" do
      healthy = false
      handler = FlakyHandler.new(failures: 0) { raise "dependency down" unless healthy }
      # Retried in place: a deferred key would not hold its partition (spec/deferral_spec.rb).
      client = start(handler, stall_threshold: 0.4, defer_enabled: false)
      expect(client.is_stalled?).to be(false)
      client.send_message(topic, "k", 1)
      wait_for(message: "a stall") { client.is_stalled? }
      healthy = true
      wait_for(message: "a successful retry") { handler.count("k") >= 2 }
      wait_for(message: "recovery") { !client.is_stalled? }
      client.unsubscribe
      expect(client.is_stalled?).to be(false)
    end
  end
end

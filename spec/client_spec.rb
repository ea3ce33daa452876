# frozen_string_literal: true

RSpec.describe Prosody::Client do
  describe "options" do
    it "rejects unknown options and names the valid ones" do
      expect { described_class.new(mock: true, max_concurency: 3) }
        .to raise_error(ArgumentError, /unknown option :max_concurency; valid options are: .*max_concurrency/)
    end

    it "rejects bad values naming the option, the accepted values and the value given" do
      expect { described_class.new(mock: true, max_concurrency: 0) }
        .to raise_error(ArgumentError, "invalid :max_concurrency, expected an Integer >= 1, got 0")
      expect { described_class.new(mock: true, commit_interval: "soon") }
        .to raise_error(ArgumentError, /invalid :commit_interval, expected a duration/)
      expect { described_class.new(mock: true, mode: :fast) }
        .to raise_error(ArgumentError,
                        'invalid :mode, expected one of :pipeline, :low_latency, :best_effort, got "fast"')
      expect { described_class.new(mock: true, subscribed_topics: 42) }
        .to raise_error(ArgumentError, /invalid :subscribed_topics, expected an Array of Strings/)
      expect { described_class.new(mock: true, group_id: Object.new) }
        .to raise_error(ArgumentError, /invalid :group_id, got an instance of Object/)
    end

    it "reports an out-of-range value against the variable it came from" do
      ENV["PROSODY_MAX_CONCURRENCY"] = "0"
      expect { described_class.new(mock: true) }
        .to raise_error(ArgumentError, 'invalid PROSODY_MAX_CONCURRENCY, expected an Integer >= 1, got "0"')
      ENV.delete("PROSODY_MAX_CONCURRENCY")
      ENV["PROSODY_SCHEDULER_WAIT_WEIGHT"] = "-1"
      expect { described_class.new(mock: true) }
        .to raise_error(ArgumentError, /invalid PROSODY_SCHEDULER_WAIT_WEIGHT, expected a number >= 0/)
      expect { described_class.new(mock: true, max_concurrency: "abc") }
        .to raise_error(ArgumentError, 'invalid :max_concurrency, expected an Integer >= 1, got "abc"')
    ensure
      %w[PROSODY_MAX_CONCURRENCY PROSODY_SCHEDULER_WAIT_WEIGHT].each { |k| ENV.delete(k) }
    end

    it "bounds every duration, and rejects zero timeouts and empty node lists" do
      expect { described_class.new(mock: true, commit_interval: 1e19) }
        .to raise_error(ArgumentError,
                        /invalid :commit_interval, expected a duration: Numeric seconds from 0 to 3155760000/)
      expect { described_class.new(mock: true, shutdown_timeout: 1e19) }
        .to raise_error(ArgumentError, /invalid :shutdown_timeout, expected a duration/)
      expect { described_class.new(mock: true, shutdown_timeout: "200y") }
        .to raise_error(ArgumentError, /invalid :shutdown_timeout/)
      expect { described_class.new(mock: true, shutdown_timeout: 0) }
        .to raise_error(ArgumentError, "invalid :shutdown_timeout, expected a duration > 0, got 0")
      expect { described_class.new(mock: true, send_timeout: "30d") }
        .to raise_error(ArgumentError, /invalid :send_timeout, expected a duration of at most 2147483 seconds/)
      [" ", ""].each do |nodes|
        expect { described_class.new(mock: true, cassandra_nodes: nodes) }
          .to raise_error(ArgumentError, /invalid :cassandra_nodes, expected an Array of Strings/)
      end
      expect(described_class.new(mock: true, commit_interval: "100y")).to be_a(described_class)
    end

    it "names the option or variable for text that is not UTF-8, and any unknown option" do
      expect { described_class.new(mock: true, group_id: "g\xff".b) }
        .to raise_error(ArgumentError, /invalid :group_id, expected valid UTF-8 text/)
      ENV["PROSODY_GROUP_ID"] = "g\xff".b
      expect { described_class.new(mock: true) }
        .to raise_error(ArgumentError, /invalid PROSODY_GROUP_ID, expected valid UTF-8/)
      ENV.delete("PROSODY_GROUP_ID")
      expect { described_class.new(mock: true, kafka: { "acks" => "all" }) }
        .to raise_error(ArgumentError, /unknown option :kafka; valid options are: /)
    ensure
      ENV.delete("PROSODY_GROUP_ID")
    end

    it "never shows a secret option's value in an error, a log line or inspect" do
      secret = "s3cr3t"
      [[secret], { secret => 1 }, 42, Object.new.tap { |o| o.define_singleton_method(:inspect) { secret } },
       "#{secret}\xff".b].each do |value|
        expect { described_class.new(mock: true, cassandra_password: value) }
          .to raise_error(ArgumentError, /cassandra_password/) { |e| expect(e.message).not_to include(secret) }
      end
      ENV["PROSODY_CASSANDRA_PASSWORD"] = "#{secret}\xff".b
      expect { described_class.new(mock: true) }
        .to raise_error(ArgumentError, /PROSODY_CASSANDRA_PASSWORD/) { |e| expect(e.message).not_to include(secret) }
      ENV.delete("PROSODY_CASSANDRA_PASSWORD")
      client = described_class.new(mock: true, cassandra_password: secret, group_id: "g")
      expect(client.inspect).not_to include(secret)
      expect(log_output).not_to include(secret)
    ensure
      ENV.delete("PROSODY_CASSANDRA_PASSWORD")
    end

    it "requires bootstrap_servers unless mock" do
      expect { described_class.new(group_id: "g") }
        .to raise_error(ArgumentError, /missing :bootstrap_servers.*PROSODY_BOOTSTRAP_SERVERS/)
    end

    it "accepts a Hash as well as keywords, and lists as Arrays or comma-separated Strings" do
      client = described_class.new({ "mock" => true, :group_id => "g" }, subscribed_topics: %w[a b])
      expect(client.consumer_state).to eq(:configured)
      expect(described_class.new(mock: true, group_id: "g", subscribed_topics: "a,b").consumer_state)
        .to eq(:configured)
    end

    it "falls back to PROSODY_* variables, which explicit options override" do
      ENV["PROSODY_GROUP_ID"] = "from-env"
      ENV["PROSODY_MAX_UNCOMMITTED"] = "abc"
      expect { described_class.new(mock: true) }
        .to raise_error(ArgumentError, 'invalid PROSODY_MAX_UNCOMMITTED, expected an Integer >= 1, got "abc"')
      ENV["PROSODY_MAX_UNCOMMITTED"] = "10"
      expect(described_class.new(mock: true).source_system).to eq("from-env")
      expect(described_class.new(mock: true, group_id: "explicit").source_system).to eq("explicit")
      ENV["PROSODY_SHUTDOWN_TIMEOUT"] = "100ms"
      expect(described_class.new(mock: true)).to be_a(described_class)
    ensure
      %w[PROSODY_GROUP_ID PROSODY_MAX_UNCOMMITTED PROSODY_SHUTDOWN_TIMEOUT].each { |k| ENV.delete(k) }
    end

    it "reports source_system (defaulting to group_id) and the consumer state" do
      expect(described_class.new(mock: true).consumer_state).to eq(:unconfigured)
      client = described_class.new(mock: true, group_id: "my-group", subscribed_topics: "t")
      expect(client.source_system).to eq("my-group")
      expect(client.consumer_state).to eq(:configured)
      expect(client.assigned_partitions).to eq(0)
    end
  end

  describe "#send_message" do
    it "rejects a bad topic, key, payload or headers with ArgumentError" do
      client = described_class.new(mock: true)
      expect { client.send_message("", "k", {}) }.to raise_error(ArgumentError, /topic must be a non-empty String/)
      expect { client.send_message("t", nil, {}) }.to raise_error(ArgumentError, /key must be a String, got nil/)
      expect { client.send_message("t", "k", Float::NAN) }
        .to raise_error(ArgumentError, /payload is NaN, which JSON cannot represent/)
      expect { client.send_message("t", "k", {}, headers: [1]) }
        .to raise_error(ArgumentError, /headers must be a Hash/)
      expect { client.send_message("t", "k", {}, headers: { "a" => 1 }) }
        .to raise_error(ArgumentError, /value of header "a" must be a String/)
    end

    it "accepts only JSON values as payload, naming where another value sits" do
      client = described_class.new(mock: true)
      expect { client.send_message("t", "k", Object.new) }
        .to raise_error(ArgumentError, /payload is a Object, which is not a JSON value/)
      expect { client.send_message("t", "k", { "a" => [1, { "b" => Time.now }] }) }
        .to raise_error(ArgumentError, /payload\["a"\]\[1\]\["b"\] is a Time/)
      expect { client.send_message("t", "k", { 1 => 2 }) }
        .to raise_error(ArgumentError, /payload has the key 1; JSON object keys must be Strings or Symbols/)
      expect { client.send_message("t", "k", [1.0 / 0]) }
        .to raise_error(ArgumentError, /payload\[0\] is Infinity/)
    end

    it "rejects a topic or a header name that is not UTF-8 text with ArgumentError" do
      client = described_class.new(mock: true)
      expect { client.send_message("t\xff".b, "k", {}) }
        .to raise_error(ArgumentError, /topic must be valid UTF-8 text/)
      expect { client.send_message("t", "k", {}, headers: { "h\xff".b => "v" }) }
        .to raise_error(ArgumentError, /header name must be valid UTF-8 text/)
    end

    it "raises Prosody::SendError after send_timeout when no broker answers" do
      client = described_class.new(bootstrap_servers: "127.0.0.1:1", send_timeout: 0.3)
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      expect { client.send_message("nowhere", "k", { "a" => 1 }) }
        .to raise_error(Prosody::SendError, /could not send to topic "nowhere".*send_timeout/)
      elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
      expect(elapsed).to be < 5
    end

    it "releases the GVL while it waits" do
      client = described_class.new(bootstrap_servers: "127.0.0.1:1", send_timeout: 0.5)
      ticks = 0
      ticker = Thread.new do
        loop do
          ticks += 1
          sleep 0.01
        end
      end
      expect { client.send_message("nowhere", "k", 1) }.to raise_error(Prosody::SendError)
      ticker.kill
      expect(ticks).to be > 10
    end
  end

  describe "#subscribe" do
    it "raises Prosody::SubscriptionError when Cassandra is unreachable, as the errors table says" do
      handler = Class.new(SpecHelpers::RecordingHandler) { def on_timer(_context, _timer); end }.new
      client = described_class.new(bootstrap_servers: "127.0.0.1:1", group_id: "g", subscribed_topics: "t",
                                   cassandra_nodes: "127.0.0.1:1")
      expect { client.subscribe(handler) }
        .to raise_error(Prosody::SubscriptionError, /could not set up the timer store/)
      expect(client.consumer_state).to eq(:configured)
    end

    it "refuses a client without group or topics, a handler without on_message, and a second subscribe" do
      expect { described_class.new(mock: true).subscribe(SpecHelpers::RecordingHandler.new) }
        .to raise_error(Prosody::SubscriptionError, /group_id is not set/)
      client = mock_client(unique("topic"))
      expect { client.subscribe(Object.new) }.to raise_error(ArgumentError, /must respond to on_message/)
      client.subscribe(SpecHelpers::RecordingHandler.new)
      expect(client.consumer_state).to eq(:running)
      expect { client.subscribe(SpecHelpers::RecordingHandler.new) }
        .to raise_error(Prosody::SubscriptionError, /already subscribed/)
    ensure
      client&.unsubscribe
    end
  end
end

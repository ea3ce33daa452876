# frozen_string_literal: true

RSpec.describe "timers in mock mode" do
  let(:topic) { unique("timer-topic") }

  it "fires on_timer for the key after the message that scheduled it, never early, then forgets it" do
    seen = {}
    handler = TimerRecorder.new do |context, message|
      at = Time.now + 1
      context.schedule(at)
      seen[:scheduled] = context.scheduled
      seen[:requested] = at
      seen[:at] = Time.at(at.to_r.ceil)
      seen[:context] = context
      seen[:key] = message.key
    end
    client = start(handler)
    client.send_message(topic, "order-1", { "n" => 1 })
    wait_for(timeout: 10, message: "the timer") { handler.timers.size == 1 }
    _, key, time, fired_at = handler.timers.first
    expect(key).to eq("order-1")
    expect(time).to eq(seen[:at])
    expect(seen[:scheduled]).to eq([seen[:at]])
    expect(fired_at).to be >= time
    expect(fired_at).to be >= seen[:requested] # never before the (sub-second) time it was given
    expect(handler.events.first.first).to eq(:message)
    expect { seen[:context].scheduled }.to raise_error(Prosody::Error, /already returned/)
    # on_cancel of a stale context raises the same error (it used to wait forever).
    expect { Timeout.timeout(5) { seen[:context].on_cancel } }.to raise_error(Prosody::Error, /already returned/)
  end

  it "never fires a timer before a sub-second time it was given" do
    requested = {}
    handler = TimerRecorder.new do |context, message|
      at = Time.now + 1 + message.payload
      requested[message.key] = at
      context.schedule(at)
    end
    client = start(handler)
    # Fractions spread over the second: whatever the clock's fraction, some round down.
    [0.1, 0.3, 0.6, 0.9].each_with_index { |f, i| client.send_message(topic, "key-#{i}", f) }
    wait_for(timeout: 15, message: "four timers") { handler.timers.size == 4 }
    handler.timers.each do |_, key, time, fired_at|
      expect(fired_at).to be >= requested.fetch(key)
      expect(time).to eq(Time.at(requested.fetch(key).to_r.ceil))
    end
  end

  it "keeps one timer per second, rounds up to the next second, and lists, removes and clears them" do
    results = {}
    handler = TimerRecorder.new do |context, _message|
      base = Time.at(Time.now.to_i + 3600)
      context.schedule(base)
      context.schedule(base - 0.6) # rounds up to base: still one timer
      context.schedule(base + 60)
      context.schedule(base + 120.6) # rounds up
      results[:after_schedule] = context.scheduled
      context.unschedule(base + 60)
      results[:after_unschedule] = context.scheduled
      context.clear_and_schedule(base + 7200)
      results[:after_clear_and_schedule] = context.scheduled
      context.clear_scheduled
      results[:after_clear] = context.scheduled
      results[:base] = base
    end
    client = start(handler)
    client.send_message(topic, "k", 1)
    wait_for(message: "the handler") { results.key?(:after_clear) }
    base = results[:base]
    expect(results[:after_schedule]).to eq([base, base + 60, base + 121])
    expect(results[:after_unschedule]).to eq([base, base + 121])
    expect(results[:after_clear_and_schedule]).to eq([base + 7200])
    expect(results[:after_clear]).to eq([])
  end

  it "lets on_timer re-arm itself, and runs timers in order with the key's messages" do
    handler = TimerRecorder.new do |context, message|
      context.schedule(Time.now - 5) if message.payload == 0 # in the past: fires as soon as possible
    end
    handler.on_timer_do do |context, _timer|
      fired = handler.timers.size
      context.schedule(Time.now) if fired < 2
    end
    client = start(handler)
    20.times { |i| client.send_message(topic, "same-key", i) }
    wait_for(timeout: 15, message: "three timers and 20 messages") do
      handler.timers.size == 3 && handler.events.count { |e| e.first == :message } == 20
    end
    expect(handler.overlaps).to eq(0)
    messages = handler.events.select { |e| e.first == :message }.map(&:last)
    expect(messages).to eq((0...20).to_a)
    expect(handler.events.index { |e| e.first == :timer }).to be > 0
  end

  it "retries a failing on_timer with backoff instead of dropping it" do
    attempts = 0
    handler = TimerRecorder.new { |context, _message| context.schedule(Time.now) }
    handler.on_timer_do do
      attempts += 1
      raise "flaky downstream" if attempts == 1
    end
    client = start(handler)
    client.send_message(topic, "k", 1)
    wait_for(timeout: 10, message: "the retried timer") { handler.timers.size == 1 }
    expect(attempts).to eq(2)
    # Pipeline mode defers a failing timer (spec/deferral_spec.rb has the details).
    expect(log_output)
      .to match(/timer topic=#{topic} partition=\d key="k" time=\d+ failed \(transient RuntimeError: flaky.*deferring/)
  end

  it "keeps timers across a rebalance in the process: another client of the group fires them" do
    group = unique("group")
    first = TimerRecorder.new { |context, _message| context.schedule(Time.now + 2) }
    client = start(first, group:)
    client.send_message(topic, "k", 1)
    wait_for(message: "the message") { first.events.size == 1 }
    client.unsubscribe
    second = TimerRecorder.new
    start(second, group:)
    wait_for(timeout: 15, message: "the timer on the new client") { second.timers.size == 1 }
    expect(first.timers).to be_empty
    expect(second.timers.first[1]).to eq("k")
  end

  it "rejects bad times, keyless events and handlers that need a store the client lacks" do
    errors = {}
    handler = TimerRecorder.new do |context, message|
      if message.key.nil?
        errors[:keyless] = begin
          context.schedule(Time.now)
        rescue StandardError
          $ERROR_INFO
        end
      else
        errors[:not_time] = begin
          context.schedule("tomorrow")
        rescue StandardError
          $ERROR_INFO
        end
        errors[:too_late] = begin
          context.schedule(Time.utc(10_000, 1, 1))
        rescue StandardError
          $ERROR_INFO
        end
        errors[:too_early] = begin
          context.schedule(Time.at(-1))
        rescue StandardError
          $ERROR_INFO
        end
      end
    end
    Prosody::Native.mock_create_topic(topic, 1)
    producer = raw_producer
    producer.produce(topic, 0, nil, "1", {})
    producer.produce(topic, 0, "k", "2", {})
    producer.flush(10)
    start(handler)
    wait_for(message: "both messages") { errors.size == 4 }
    expect(errors[:not_time]).to be_a(ArgumentError).and have_attributes(message: /must be a Time/)
    expect(errors[:too_late]).to be_a(ArgumentError).and have_attributes(message: /outside the supported range/)
    expect(errors[:too_early]).to be_a(ArgumentError).and have_attributes(message: /outside the supported range/)
    expect(errors[:keyless]).to be_a(Prosody::TimerError).and have_attributes(message: /no key/)

    real = Prosody::Client.new(bootstrap_servers: "127.0.0.1:1", group_id: "g", subscribed_topics: "t")
    expect { real.subscribe(TimerRecorder.new) }.to raise_error(Prosody::SubscriptionError, /cassandra_nodes/)
    expect(real.consumer_state).to eq(:configured)
  end
end

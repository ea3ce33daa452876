# frozen_string_literal: true

# Proves that what the binding hands to Ruby (messages with their cached payloads and headers,
# timers, context results) stays intact while the GC collects before every allocation, so a Ruby
# value the binding keeps without a GC mark shows here as a wrong value or a crash.
#
# Slow, so a plain `rspec` leaves it out (spec_helper); `make test-gc-stress` runs it:
# PROSODY_GC_STRESS=1 rspec --tag gc_stress (PROSODY_GC_STRESS=full: GC.stress = true, see MODE).
module GcStress
  # GC.stress = true marks the whole heap before every allocation: ~7 ms with the suite loaded,
  # over a second per handler call, a quarter of an hour for this file. Flag 0x01 ("no major")
  # still collects before every allocation, with a minor mark and an immediate sweep (~0.25 ms):
  # a young value the binding made and did not keep (or keeps without marking) is freed and its
  # slot reused at once. A value that grew old first (kept on a stack through a few collections)
  # is freed only by a full mark: each handler call and each final read of a message add one.
  FULL = ENV.fetch("PROSODY_GC_STRESS", nil) == "full"
  MODE = FULL ? true : 0x01
  # Deadline for the messages of one example to go through.
  TIMEOUT = FULL ? 1800 : 90

  module_function

  # A payload with what the binding converts one by one: nested Hashes and Arrays, Strings
  # (embedded, heap and non-ASCII), Integers past 64 bits, Floats, true, false and nil.
  def payload_for(key, seq)
    {
      "key" => key, "seq" => seq,
      "big" => (2**70) + seq, "negative" => -(2**66) - seq, "float" => seq + 0.25,
      "text" => "héllo ✓ #{key}/#{seq} #{'x' * (seq % 5 * 60)}",
      "list" => [seq, "item-#{seq}", nil, true, false, [(2**64) + seq, { "deep" => ["leaf-#{seq}", []] }]],
      "nested" => { "a" => { "b" => { "c" => Array.new(3) { |i| "c#{i}-#{seq}" } } }, "empty" => {} }
    }
  end

  def headers_for(key, seq)
    { "seq" => seq.to_s, "trace" => "#{key}/#{seq}", "blob" => "h" * (seq % 4 * 50) }
  end

  # Headers as consumed: the sender adds its source system.
  def received_headers(key, seq)
    headers_for(key, seq).merge("source-system" => "spec-producer")
  end

  def send_all(client, topic, keys, per_key)
    per_key.times do |seq|
      keys.each { |key| client.send_message(topic, key, payload_for(key, seq), headers: headers_for(key, seq)) }
    end
  end

  # What is wrong with +message+, a record as sent by send_all (nil when nothing). The payload
  # names its key and seq, and must equal what was sent for them, as must the key and headers.
  def sent_problem(message)
    seq = seq_of(message)
    return "no seq in #{message.inspect}: #{message.payload.inspect}" unless seq

    key = message.key
    problem(message, seq,
            payload: message.payload == payload_for(key, seq),
            headers: message.headers == received_headers(key, seq),
            cached: message.payload.equal?(message.payload) && message.headers.equal?(message.headers))
  end

  def seq_of(message)
    payload = message.payload
    seq = payload.is_a?(Hash) && (payload["seq"] || payload.dig("original", "seq"))
    seq.is_a?(Integer) ? seq : nil
  end

  def problem(message, seq, **checks)
    failed = checks.reject { |_, ok| ok }.keys
    "#{message.key.inspect}/#{seq}: wrong #{failed.join(', ')}: #{message.payload.inspect} #{message.headers}" \
      unless failed.empty?
  end

  # Garbage of the shapes a freed payload's slots would be reused for.
  def churn
    Array.new(6) { |i| { "churn-#{i}" => [(2**80) + i, "s" * (i * 30), [i.to_s]] } }.size
  end

  def by_key(messages)
    messages.group_by(&:key).transform_values { |list| list.map { |m| seq_of(m) } }
  end
end

# Checks each message twice (the second read comes from the binding's cache, after other
# handlers ran and garbage and a full GC were made), runs the example's block, and keeps the
# message so the example can read it once more at the end.
class GcStressHandler < Prosody::EventHandler
  # The failure example's error that goes to the failure topic at once.
  permanent :on_message, TypeError

  # @return [Array<String>] what the checks found wrong
  attr_reader :problems
  # @return [Numeric] the fewest collections seen between a message's two reads
  attr_reader :fewest_collections

  # +check+ returns what is wrong with a message, +on_timer+ what is wrong with a timer (nil when
  # nothing); the block runs for each message after the checks.
  def initialize(check, on_timer: nil, &on_message)
    super()
    @check = check
    @on_message = on_message
    @on_timer = on_timer
    # No Mutex in handlers (see SpecHelpers::RecordingHandler): Array appends are atomic.
    @messages = []
    @timers = []
    @problems = []
    @fewest_collections = Float::INFINITY
  end

  def on_message(context, message)
    verify(message)
    @messages << message
    @on_message&.call(context, message)
  end

  def on_timer(context, timer)
    problem = @on_timer&.call(context, timer)
    @problems << problem if problem
    @timers << [timer.key, timer.time]
  end

  def messages
    @messages.dup
  end

  def timers
    @timers.dup
  end

  def count
    @messages.size
  end

  def problem!(text)
    @problems << text
  end

  private

  def verify(message)
    first = @check.call(message)
    before = GC.count
    Async::Task.current.yield # other handlers run and convert their messages
    GcStress.churn
    GC.start
    collections = GC.count - before
    second = @check.call(message)
    @fewest_collections = [@fewest_collections, collections].min
    @problems.push(*[first, second].compact)
  end
end

RSpec.describe "the binding under GC.stress (mock mode)", :gc_stress do
  let(:topic) { unique("gc-topic") }

  # Turns GC.stress on for the block: handlers run and the example reads its messages under it.
  def under_gc_stress
    GC.stress = GcStress::MODE
    yield
  ensure
    GC.stress = false
  end

  # Sends +per_key+ messages for each of +count+ keys named "+prefix+-N" to the topic; the keys.
  def seed(prefix, count, per_key)
    keys = Array.new(count) { |k| "#{prefix}-#{k}" }
    GcStress.send_all(mock_client(topic), topic, keys, per_key)
    keys
  end

  # A second mock topic (4 partitions), for what handlers forward or dead-letter.
  def other_topic(prefix)
    unique(prefix).tap { |name| Prosody::Native.mock_create_topic(name, 4) }
  end

  # Each key's sequence numbers 0...per_key, as GcStress.by_key gives them.
  def every_seq(keys, per_key)
    keys.to_h { |key| [key, (0...per_key).to_a] }
  end

  # Every message the handler kept, read again after a full GC (cached payload and headers).
  def reread(handler, check)
    GC.start
    handler.messages.filter_map { |message| check.call(message) }
  end

  it "hands over every payload, header and key exactly as sent, once and in order per key (6 keys x 25)" do
    per_key = 25
    keys = seed("clé", 6, per_key)
    check = GcStress.method(:sent_problem)
    handler = GcStressHandler.new(check)
    late = under_gc_stress do
      start(handler, max_concurrency: 8)
      wait_for(timeout: GcStress::TIMEOUT, message: "#{keys.size * per_key} messages") do
        handler.count >= keys.size * per_key
      end
      reread(handler, check)
    end
    expect(handler.problems).to be_empty
    expect(late).to be_empty
    expect(GcStress.by_key(handler.messages)).to eq(every_seq(keys, per_key))
    expect(handler.fewest_collections).to be > 10 # GC.stress was on while handlers ran
  end

  it "sends from inside handlers what they built from consumed values, and a second client receives it (5 x 12)" do
    forwarded = other_topic("gc-forwarded")
    per_key = 12
    keys = seed("key", 5, per_key)
    forwarder = mock_client(topic)
    first = GcStressHandler.new(GcStress.method(:sent_problem)) do |_context, message|
      forwarder.send_message(forwarded, message.key, { "original" => message.payload, "headers" => message.headers },
                             headers: { "via" => "forwarder", "seq" => message.headers["seq"] })
    end
    check = lambda do |message|
      key = message.key
      seq = GcStress.seq_of(message)
      next "no seq in #{message.inspect}: #{message.payload.inspect}" unless seq

      GcStress.problem(message, seq,
                       payload: message.payload == { "original" => GcStress.payload_for(key, seq),
                                                     "headers" => GcStress.received_headers(key, seq) },
                       headers: message.headers == { "via" => "forwarder", "seq" => seq.to_s,
                                                     "source-system" => "spec-producer" })
    end
    second = GcStressHandler.new(check)
    late = under_gc_stress do
      subscribe_tracked(mock_client(forwarded), second)
      subscribe_tracked(forwarder, first)
      wait_for(timeout: GcStress::TIMEOUT, message: "#{keys.size * per_key} forwarded messages") do
        second.count >= keys.size * per_key
      end
      reread(first, GcStress.method(:sent_problem)) + reread(second, check)
    end
    expect(first.problems + second.problems).to be_empty
    expect(late).to be_empty
    expected = every_seq(keys, per_key)
    expect(GcStress.by_key(first.messages)).to eq(expected)
    expect(GcStress.by_key(second.messages)).to eq(expected)
  end

  it "schedules timers in on_message, lists them, and fires each for its key at its time (24 keys x 2)" do
    per_key = 2
    keys = seed("timer", 24, per_key)
    wanted = Hash.new { |h, k| h[k] = [] }
    on_timer = lambda do |context, timer|
      listed = context.scheduled
      next "#{timer.inspect} fired early" if Time.now < timer.time
      next "scheduled is #{listed.inspect}" unless listed.all?(Time)
    end
    handler = GcStressHandler.new(GcStress.method(:sent_problem), on_timer:) do |context, message|
      at = Time.at((Time.now + GcStress.seq_of(message)).to_r.ceil)
      context.schedule(at)
      listed = context.scheduled
      handler.problem!("#{message.key}: #{at} not in #{listed}") unless listed.include?(at)
      wanted[message.key] << at
    end
    late = under_gc_stress do
      start(handler)
      wait_for(timeout: GcStress::TIMEOUT, message: "#{keys.size * per_key} timers") do
        handler.timers.size >= keys.size * per_key
      end
      reread(handler, GcStress.method(:sent_problem))
    end
    expect(handler.problems).to be_empty
    expect(late).to be_empty
    expect(GcStress.by_key(handler.messages)).to eq(every_seq(keys, per_key))
    fired = handler.timers.group_by(&:first).transform_values { |list| list.map(&:last) }
    expect(fired).to eq(wanted.transform_values(&:uniq))
  end

  it "retries transient failures, dead-letters a permanent one, and a second client reads it back (8 x 6)" do
    dlq = other_topic("gc-dlq")
    per_key = 6
    keys = seed("key", 8, per_key)
    attempts = Hash.new(0)
    # Seqs 1 and 4 fail twice, then succeed; seq 5 fails for good.
    handler = GcStressHandler.new(GcStress.method(:sent_problem)) do |_context, message|
      seq = GcStress.seq_of(message)
      tries = (attempts[[message.key, seq]] += 1)
      raise TypeError, "permanent #{message.key}/#{seq}" if seq == 5
      raise "transient #{message.key}/#{seq}" if (seq % 3 == 1) && tries <= 2
    end
    check = lambda do |message|
      key = message.key
      headers = message.headers
      GcStress.problem(message, 5,
                       payload: message.payload == GcStress.payload_for(key, 5),
                       headers: headers.slice("seq", "trace", "blob") == GcStress.headers_for(key, 5),
                       dead_letter: headers.slice("prosody-dlq-reason", "prosody-dlq-error-class",
                                                  "prosody-dlq-error-message", "prosody-dlq-attempts",
                                                  "prosody-dlq-source-topic") ==
                                    { "prosody-dlq-reason" => "permanent", "prosody-dlq-error-class" => "TypeError",
                                      "prosody-dlq-error-message" => "permanent #{key}/5",
                                      "prosody-dlq-attempts" => "1", "prosody-dlq-source-topic" => topic })
    end
    dead = GcStressHandler.new(check)
    calls = keys.size * 10 # per key: seqs 0, 2, 3 and 5 once, 1 and 4 three times
    late = under_gc_stress do
      subscribe_tracked(mock_client(dlq), dead)
      start(handler, failure_topic: dlq, retry_base: 0.005, max_retry_delay: 0.05)
      wait_for(timeout: GcStress::TIMEOUT, message: "#{calls} calls and #{keys.size} dead letters") do
        handler.count >= calls && dead.count >= keys.size
      end
      reread(handler, GcStress.method(:sent_problem)) + reread(dead, check)
    end
    expect(handler.problems + dead.problems).to be_empty
    expect(late).to be_empty
    expect(GcStress.by_key(handler.messages)).to eq(keys.to_h { |key| [key, [0, 1, 1, 1, 2, 3, 4, 4, 4, 5]] })
    expect(dead.messages.map(&:key)).to match_array(keys)
  end
end

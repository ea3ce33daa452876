# frozen_string_literal: true

# Keys and header values are bytes: keys that are not UTF-8 stay distinct (in ordering, timers
# and message.key) and arrive byte for byte as binary Strings; UTF-8 ones arrive as UTF-8 Strings.
RSpec.describe "Keys and header values as bytes" do
  let(:topic) { unique("bytes") }

  it "keeps keys that are not UTF-8 apart, in order, and exactly as sent" do
    a = "\xff\xfe".b
    b = "\xfe\xff".b
    handler = TimerRecorder.new do |context, message|
      context.schedule(Time.now) if message.payload == 2
    end
    client = start(handler)
    3.times do |i|
      client.send_message(topic, a, i, headers: { "bin" => "\x00\xff".b, "text" => "héllo" })
      client.send_message(topic, b, i)
    end
    wait_for(message: "six messages and two timers") do
      handler.events.count { |e| e.first == :message } == 6 && handler.timers.size == 2
    end
    by_key = handler.events.select { |e| e.first == :message }.group_by { |e| e[1] }
    expect(by_key.keys).to contain_exactly(a, b)
    expect(by_key.keys.map(&:encoding)).to all(eq(Encoding::BINARY))
    expect(by_key[a].map(&:last)).to eq([0, 1, 2])
    expect(by_key[b].map(&:last)).to eq([0, 1, 2])
    expect(handler.timers.map { |t| t[1] }).to contain_exactly(a, b)
    expect(handler.overlaps).to eq(0)
  end

  it "delivers header values byte for byte, and UTF-8 keys and values as UTF-8 Strings" do
    seen = Queue.new
    client = start(SpecHelpers::RecordingHandler.new { |_c, m| seen << [m.key, m.headers] })
    client.send_message(topic, "ключ", 1, headers: { "bin" => "\x00\xff".b, "text" => "héllo" })
    key, headers = Timeout.timeout(20) { seen.pop }
    expect(key).to eq("ключ")
    expect(key.encoding).to eq(Encoding::UTF_8)
    expect(headers["bin"]).to eq("\x00\xff".b)
    expect(headers["bin"].encoding).to eq(Encoding::BINARY)
    expect(headers["text"]).to eq("héllo")
    expect(headers["text"].encoding).to eq(Encoding::UTF_8)
  end
end

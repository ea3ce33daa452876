# frozen_string_literal: true

# Event-type filtering (allowed_events) in mock mode: the README's matching rules, the option in
# both its forms, and filtered messages committed without a handler call.
RSpec.describe "event-type filtering (mock)" do
  let(:topic) { unique("filter-topic") }
  let(:group) { unique("group") }

  def start(handler, **options)
    super(handler, group:, mock_partitions: 1, **options)
  end

  # The README's examples, and payloads without a String type.
  payloads = [
    { "type" => "user.created" },
    { "type" => "account.deleted" },
    { "type" => "admin.user.created" },
    { "type" => "my.account.deleted" },
    { "type" => "notification" },
    { "no" => "type" },
    { "type" => 7 },
    "user.created"
  ].freeze
  allowed = [
    { "type" => "user.created" },
    { "type" => "account.deleted" },
    { "no" => "type" },
    { "type" => 7 },
    "user.created"
  ].freeze

  define_method(:run_filter) do |client, handler|
    payloads.each { |payload| client.send_message(topic, "k", payload) }
    marker = { "marker" => true }
    client.send_message(topic, "k", marker)
    wait_for(message: "the marker") { handler.succeeded("k").include?(marker) }
    expect(handler.succeeded("k")).to eq(allowed + [marker])
    expect(client.skipped_events[:filtered]).to eq(3)
  end

  it "handles only the types that start with an allowed prefix, and messages without a String type" do
    handler = SwitchHandler.new([])
    debug_logging!
    client = start(handler, allowed_events: ["user.", "account."])
    run_filter(client, handler)
    expect(log_output)
      .to match(/skipping message of type "admin.user.created" \(not in allowed_events\) topic=#{topic}/)
  end

  it "reads PROSODY_ALLOWED_EVENTS as a comma-separated list" do
    ENV["PROSODY_ALLOWED_EVENTS"] = "user.,account."
    handler = SwitchHandler.new([])
    run_filter(start(handler), handler)
  ensure
    ENV.delete("PROSODY_ALLOWED_EVENTS")
  end

  it "commits filtered messages: the group's next client starts after them" do
    handler = SwitchHandler.new([])
    client = start(handler, allowed_events: "user.")
    5.times { |i| client.send_message(topic, "k", { "type" => "admin.#{i}" }) }
    client.send_message(topic, "k", { "type" => "user.last" })
    wait_for(message: "the allowed message") { handler.succeeded("k").any? }
    client.unsubscribe

    later = SwitchHandler.new([])
    client = start(later, allowed_events: "user.")
    client.send_message(topic, "k", { "type" => "user.next" })
    wait_for(message: "the next message") { later.succeeded("k").any? }
    expect(later.succeeded("k")).to eq([{ "type" => "user.next" }])
  end

  it "refuses an empty prefix in the Array, naming the option" do
    expect { Prosody::Client.new(mock: true, allowed_events: ["user.", ""]) }
      .to raise_error(ArgumentError, /invalid :allowed_events, expected an Array of Strings/)
  end
end

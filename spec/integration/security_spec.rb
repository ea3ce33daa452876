# frozen_string_literal: true

# Secured clusters for real: the local broker's TLS listener (client certificates required) and its
# SASL_SSL listener (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512; user prosody), both from dev/services,
# with the certificates it made. Each round-trips a message through send_message and a subscribed
# handler; a wrong password fails a send with an error that names the refusal, within about
# send_timeout, and subscribe does not hang. Also kafka_config reaching librdkafka.
RSpec.describe "secured clusters and librdkafka settings", :kafka do
  let(:tls_dir) { File.join(ENV.fetch("PROSODY_DEV_CACHE", "/var/cache/prosody-dev"), "kafka/tls") }
  let(:tls) do
    { bootstrap_servers: "127.0.0.1:9094", ssl_ca_location: "#{tls_dir}/ca.pem",
      ssl_certificate_location: "#{tls_dir}/client.pem", ssl_key_location: "#{tls_dir}/client.key",
      ssl_key_password: "client-key-secret" }
  end

  def sasl(mechanism, password: "prosody-secret")
    { bootstrap_servers: "127.0.0.1:9095", ssl_ca_location: "#{tls_dir}/ca.pem", sasl_mechanism: mechanism,
      sasl_username: "prosody", sasl_password: password }
  end

  # A message sent through a client with +security+ reaches a handler subscribed through another.
  def round_trip(security)
    topic = create_topic(unique("secured"), partitions: 1)
    handler = SpecHelpers::RecordingHandler.new
    consumer = Prosody::Client.new(**security, group_id: unique("group"), subscribed_topics: topic,
                                               commit_interval: 0.1, send_timeout: 15)
    subscribe_tracked(consumer, handler)
    producer = Prosody::Client.new(**security, send_timeout: 15)
    producer.send_message(topic, "k", { "secured" => true })
    wait_for(message: "the message through the secured listener") { handler.count == 1 }
    expect(handler.payloads).to eq([{ "secured" => true }])
  end

  it "round-trips through TLS with a client certificate and an encrypted key" do
    round_trip(tls)
  end

  %w[PLAIN SCRAM-SHA-256 SCRAM-SHA-512].each do |mechanism|
    it "round-trips through SASL #{mechanism} over TLS" do
      round_trip(sasl(mechanism))
    end
  end

  it "fails a send with a wrong password, saying the cluster refused it, and never hangs subscribe" do
    options = sasl("SCRAM-SHA-256", password: "not-the-password")
    client = Prosody::Client.new(**options, send_timeout: 3)
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    expect { client.send_message(unique("refused"), "k", { "n" => 1 }) }
      .to raise_error(Prosody::SendError, /send_timeout \(3s\).*refused this client.*SASL authentication/)
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 3 + 1.5
    consumer = Prosody::Client.new(**options, group_id: unique("group"), subscribed_topics: unique("refused"))
    Timeout.timeout(10) do
      consumer.subscribe(SpecHelpers::RecordingHandler.new)
      consumer.unsubscribe
    end
    expect(log_output).to match(/SASL authentication error/)
    expect(log_output).not_to include("not-the-password")
    expect(client.inspect).not_to include("not-the-password")
  end

  it "refuses a TLS client without the certificate the listener requires, naming the refusal" do
    client = Prosody::Client.new(bootstrap_servers: "127.0.0.1:9094", ssl_ca_location: "#{tls_dir}/ca.pem",
                                 send_timeout: 3)
    expect { client.send_message(unique("refused"), "k", { "n" => 1 }) }
      .to raise_error(Prosody::SendError, /refused this client/)
  end

  it "passes kafka_config to librdkafka: auto.offset.reset latest skips what was there before" do
    topic = create_topic(unique("latest"), partitions: 1)
    before = kafka_client(topic)
    before.send_message(topic, "k", { "n" => "before" })
    handler = SpecHelpers::RecordingHandler.new
    client = subscribe_tracked(kafka_client(topic, consumer_kafka_config: { "auto.offset.reset" => "latest" }),
                               handler)
    wait_for(message: "an assignment") { client.assigned_partitions.positive? }
    # Positions for a new group are resolved when the partition is first fetched; a record sent
    # once the assignment is in place is after the position "latest" picked.
    wait_for(message: "the record sent after subscribing") do
      before.send_message(topic, "k", { "n" => "after" })
      handler.count.positive?
    end
    expect(handler.payloads).not_to include({ "n" => "before" })
  end
end

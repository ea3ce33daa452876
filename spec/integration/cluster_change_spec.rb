# frozen_string_literal: true

# A broker that comes back as a new cluster (its data wiped) is not a silent hang: the producer
# logs one ERROR and replaces itself, so sends work again; the consumer logs one ERROR, reads as
# stalled, and unsubscribe reports it; subscribing again reads from the new cluster.
RSpec.describe "The Kafka cluster changing under a client", :kafka do
  def restart_kafka_wiped
    dev = File.expand_path("../../dev/services", __dir__)
    out = `#{dev} stop kafka 2>&1 && #{dev} start kafka 2>&1 && #{dev} wait kafka 2>&1`
    raise "could not restart Kafka: #{out}" unless $CHILD_STATUS.success?
  end

  it "is detected, logged once, and recovered from" do
    topic = create_topic(unique("cluster-change"))
    handler = SpecHelpers::RecordingHandler.new
    client = subscribe_tracked(kafka_client(topic, send_timeout: 5), handler)
    client.send_message(topic, "k", "before")
    wait_for(timeout: 60, message: "the first message") { handler.payloads.include?("before") }

    restart_kafka_wiped

    failures = []
    wait_for(timeout: 120, message: "a send to the new cluster") do
      client.send_message(topic, "k", "after")
      true
    rescue Prosody::SendError => e
      failures << e.message
      false
    end
    puts "\nsends that failed while the producer was replaced: #{failures.size}"
    # One ERROR line per librdkafka producer (this client's has send_timeout 5 s; earlier examples
    # of the process may have left others connected to the broker) and one from the consumer.
    producer_line = /ERROR -- prosody: .*bootstrap_servers changed \(.*producer for \S+ with send_timeout 5s/
    consumer_line = /ERROR -- prosody: .*bootstrap_servers changed under this consumer/
    wait_for(timeout: 60, message: "the producer's and the consumer's errors") do
      lines = log_output.lines
      lines.grep(producer_line).any? && lines.grep(consumer_line).any?
    end
    expect(log_output.lines.grep(producer_line).size).to eq(1)
    expect(log_output.lines.grep(consumer_line).size).to eq(1)
    expect(client.is_stalled?).to be(true)
    expect { client.unsubscribe }.to raise_error(Prosody::Error, /cluster behind bootstrap_servers changed/)

    again = SpecHelpers::RecordingHandler.new
    subscribe_tracked(client, again)
    wait_for(timeout: 60, message: "the message sent to the new cluster") { again.payloads.include?("after") }
  end
end

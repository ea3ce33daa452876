# frozen_string_literal: true

# The integration tier runs against the real Apache Kafka that `dev/services` starts on
# 127.0.0.1:9092 (make test starts it). Examples tagged :kafka fail, never pass, when it is down.
module KafkaHelpers
  BOOTSTRAP = ENV.fetch("PROSODY_TEST_KAFKA", "127.0.0.1:9092")
  CASSANDRA = ENV.fetch("PROSODY_TEST_CASSANDRA", "127.0.0.1:9042")

  def self.ensure_kafka!
    probe = File.expand_path("../../dev/probe.py", __dir__)
    return if system("python3", probe, "kafka", BOOTSTRAP, out: File::NULL, err: File::NULL)

    raise "Kafka is not answering on #{BOOTSTRAP}; start it with `dev/services start kafka && " \
          "dev/services wait kafka` (make test does this)"
  end

  def self.ensure_cassandra!
    probe = File.expand_path("../../dev/probe.py", __dir__)
    return if system("python3", probe, "cassandra", CASSANDRA, out: File::NULL, err: File::NULL)

    raise "Cassandra is not answering on #{CASSANDRA}; start it with `dev/services start cassandra && " \
          "dev/services wait cassandra` (make test does this)"
  end

  def kafka_client(topic, group: unique("group"), **options)
    Prosody::Client.new(bootstrap_servers: BOOTSTRAP, group_id: group, source_system: "spec-producer",
                        subscribed_topics: topic, commit_interval: 0.1, send_timeout: 15, **options)
  end

  # Creates the topic with four partitions and waits until every partition has a leader.
  def create_topic(topic, partitions: 4)
    Prosody::Native.create_topic(BOOTSTRAP, topic, partitions)
    topic
  end

  def raw_kafka_producer
    Prosody::Native::RawProducer.new(BOOTSTRAP)
  end
end

RSpec.configure do |config|
  config.include KafkaHelpers, :kafka
  config.before(:context, :kafka) { KafkaHelpers.ensure_kafka! }
  config.before(:context, :cassandra) { KafkaHelpers.ensure_cassandra! }
end

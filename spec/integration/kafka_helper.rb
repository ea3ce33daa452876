# frozen_string_literal: true

require "rbconfig"
require "tmpdir"

# The integration tier runs against the real Apache Kafka that `dev/services` starts on
# 127.0.0.1:9092 (make test starts it). Examples tagged :kafka fail, never pass, when it is down.
module KafkaHelpers
  BOOTSTRAP = ENV.fetch("PROSODY_TEST_KAFKA", "127.0.0.1:9092")
  CASSANDRA = ENV.fetch("PROSODY_TEST_CASSANDRA", "127.0.0.1:9042")

  def self.ensure_kafka!
    ensure_service!("kafka", "Kafka", BOOTSTRAP)
  end

  def self.ensure_cassandra!
    ensure_service!("cassandra", "Cassandra", CASSANDRA)
  end

  # Fails with how to start +service+ unless it answers on +address+ in its own protocol.
  def self.ensure_service!(service, name, address)
    probe = File.expand_path("../../dev/probe.py", __dir__)
    return if system("python3", probe, service, address, out: File::NULL, err: File::NULL)

    raise "#{name} is not answering on #{address}; start it with `dev/services start #{service} && " \
          "dev/services wait #{service}` (make test does this)"
  end

  # The examples' clients run on the real broker.
  def client_for(topic, **options)
    kafka_client(topic, **options)
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

  # Runs spec/integration/<script> in a child Ruby process with +args+ followed by the path of
  # its output file, waits until that file contains +marker+, SIGKILLs the child (no clean
  # shutdown, as in a crash), and returns the file's lines.
  def run_child_until_killed(script, args, marker, timeout: 60)
    out_path = File.join(Dir.tmpdir, "#{unique(File.basename(script, '.rb'))}.log")
    pid = Process.spawn(RbConfig.ruby, File.expand_path(script, __dir__), *args.map(&:to_s), out_path)
    begin
      wait_for(timeout:, message: "#{script} to write #{marker}") do
        File.exist?(out_path) && File.read(out_path).include?(marker)
      end
    ensure
      Process.kill(:KILL, pid)
      Process.wait(pid)
    end
    File.readlines(out_path, chomp: true)
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

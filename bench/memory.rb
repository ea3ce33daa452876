# frozen_string_literal: true

# Prefetch memory: this process's peak RSS while a client consumes COUNT small records (the
# consume benchmark's payloads) from PARTITIONS partitions of the in-process mock cluster, with a
# handler that reads each payload. Prints the peak before consuming (Ruby, the engine and the mock
# cluster holding the records) and during it. librdkafka's prefetch is what grows with the
# partitions; Prosody bounds it per client (prefetch_records, shared by the partitions; set
# PROSODY_PREFETCH_RECORDS to compare, e.g. 3200000 for librdkafka's 100,000 per partition).
#
# Usage: ruby -Ilib bench/memory.rb [COUNT] [PARTITIONS]   (make bench runs 1,000,000 on 32)

require_relative "support"

COUNT = Integer(ARGV[0] || 1_000_000)
PARTITIONS = Integer(ARGV[1] || 32)

# Reads the payload.
class ReadingHandler < BenchHandler
  def work(message)
    message.payload
  end
end

# VmHWM (peak resident set) of this process, in MB.
def peak_mb
  File.read("/proc/self/status")[/VmHWM:\s+(\d+)/, 1].to_i / 1024
end

topic = "bench-memory-#{SecureRandom.hex(4)}"
fill(topic, PARTITIONS, COUNT, 10_000)
GC.start
before = peak_mb
client = Prosody::Client.new(mock: true, group_id: "bench-#{SecureRandom.hex(4)}", subscribed_topics: topic,
                             max_concurrency: 32)
rate, = subscription_rates(client, ReadingHandler.new(COUNT), COUNT)
puts format("prefetch memory, %<count>d records on %<partitions>d partitions (mock, prefetch_records %<budget>s): " \
            "peak RSS %<before>d MB before consuming, %<after>d MB while consuming (%<rate>.0f msg/s)",
            count: COUNT, partitions: PARTITIONS, before:, after: peak_mb, rate:,
            budget: ENV.fetch("PROSODY_PREFETCH_RECORDS", "64000"))

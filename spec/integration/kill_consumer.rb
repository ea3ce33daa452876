# frozen_string_literal: true

# A consumer process for the restart spec: handles messages, appending "partition offset" to a
# file as each handler finishes; after PAUSE_AFTER messages it writes "PAUSED" and blocks, so the
# spec can SIGKILL it with a known committed prefix.
$LOAD_PATH.unshift(File.expand_path("../../lib", __dir__))
require "prosody"

bootstrap, topic, group, pause_after, out_path = ARGV
pause_after = Integer(pause_after)
Prosody.logger = Logger.new(File::NULL)

# Records each finished message, then stalls every handler once enough were recorded.
class Recorder < Prosody::EventHandler
  def initialize(out, pause_after)
    super()
    @out = out
    @pause_after = pause_after
    @count = 0
  end

  def on_message(_context, message)
    sleep 10_000 if @count >= @pause_after # stalled handlers never finish: nothing more commits
    @out.puts("#{message.partition} #{message.offset}")
    @out.flush
    @count += 1
    return unless @count == @pause_after

    Thread.new do
      sleep 1.5 # several commit intervals: everything finished so far is committed
      @out.puts("PAUSED")
      @out.flush
    end
  end
end

out = File.open(out_path, "a")
client = Prosody::Client.new(bootstrap_servers: bootstrap, group_id: group, subscribed_topics: topic,
                             commit_interval: 0.1, max_concurrency: 4)
client.subscribe(Recorder.new(out, pause_after))
sleep

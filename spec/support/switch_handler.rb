# frozen_string_literal: true

# Fails every call for the keys in +failing+ (an Array the example may change while it runs),
# records every call. No Mutex (see SpecHelpers::RecordingHandler): calls travel through a Queue.
class SwitchHandler < Prosody::EventHandler
  attr_reader :failing

  def initialize(failing)
    super()
    @failing = failing
    @calls = Queue.new
  end

  def on_message(_context, message)
    failed = @failing.include?(message.key)
    @calls << [message.key, message.payload, failed ? :failed : :ok]
    raise "#{message.key} is down" if failed
  end

  # [[key, payload, :ok | :failed]] in call order.
  def calls
    @log ||= []
    @log << @calls.pop until @calls.empty?
    @log.dup
  end

  def succeeded(key = nil)
    calls.select { |k, _, outcome| outcome == :ok && (key.nil? || k == key) }.map { |_, p, _| p }
  end

  def count(key)
    calls.count { |k, _, _| k == key }
  end

  # [[key, payload["seq"]]] of the successful calls, in call order.
  def seen
    calls.select { |_, _, outcome| outcome == :ok }.map { |k, p, _| [k, p.fetch("seq")] }
  end
end

# frozen_string_literal: true

# Fails the first +failures+ calls per key with +error+, records every call.
class FlakyHandler < Prosody::EventHandler
  attr_reader :calls

  def initialize(failures: Float::INFINITY, error: -> { RuntimeError.new("flaky") }, &block)
    super()
    @failures = failures
    @error = error
    @block = block
    @calls = Hash.new { |h, k| h[k] = [] }
  end

  def on_message(context, message)
    attempts = (@calls[message.key] << message.payload).size
    @block&.call(context, message, attempts)
    raise @error.call if attempts <= @failures
  end

  def count(key)
    @calls[key].size
  end
end

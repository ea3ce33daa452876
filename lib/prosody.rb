# frozen_string_literal: true

require "json"
require "logger"
require "async"
require "async/notification"
require "nio"

require_relative "prosody/version"
require_relative "prosody/errors"
require "prosody/prosody"
require_relative "prosody/logging"
require_relative "prosody/message"
require_relative "prosody/context"
require_relative "prosody/event_handler"
require_relative "prosody/processor"
require_relative "prosody/client"

# Kafka consumption with per-key order, cross-key concurrency and a Rust engine.
module Prosody
end

# frozen_string_literal: true

require "json"
require "logger"
require "async"
require "async/notification"

require_relative "prosody/version"
require_relative "prosody/errors"
begin
  require "prosody/prosody"
rescue LoadError => e
  # A git checkout, or Bundler's path: source, builds no extension. Only a missing extension is
  # explained here; a LoadError from loading it (a broken or foreign build) is re-raised as it is.
  raise unless e.path == "prosody/prosody"

  raise LoadError, "Prosody's native extension is not built: run `bundle exec rake compile` (or `rake compile`; " \
                   "needs cargo) in the gem's directory to build it (#{e.message})"
end
require_relative "prosody/logging"
require_relative "prosody/message"
require_relative "prosody/context"
require_relative "prosody/outgoing"
require_relative "prosody/pending"
require_relative "prosody/event_handler"
require_relative "prosody/async_runtime"
require_relative "prosody/tracing"
require_relative "prosody/processor"
require_relative "prosody/client"

# Kafka consumption with per-key order, cross-key concurrency and a Rust engine.
module Prosody
end

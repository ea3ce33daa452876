# frozen_string_literal: true

require_relative "lib/prosody/version"

Gem::Specification.new do |spec|
  spec.name = "prosody"
  spec.version = Prosody::VERSION
  spec.summary = "Kafka for Ruby with per-key order, cross-key concurrency and a Rust engine"
  spec.description = "Consume and produce Kafka messages from Ruby: per-key ordering with " \
                     "concurrency across keys, exact offset tracking, bounded memory, and an " \
                     "in-process mock cluster for tests. The engine is Rust (librdkafka, tokio)."
  spec.authors = ["Prosody developers"]
  spec.license = "MIT"
  spec.required_ruby_version = ">= 3.1"
  spec.files = Dir.chdir(__dir__) do
    `git ls-files -z`.split("\x0").select do |f|
      f.start_with?("lib/", "sig/", "core/", "ext/") ||
        %w[Cargo.toml Cargo.lock README.md CHANGELOG.md ARCHITECTURE.md].include?(f)
    end
  end
  spec.require_paths = ["lib"]
  spec.extensions = ["ext/prosody/extconf.rb"]
  spec.add_dependency "async", ">= 1.30", "< 3"
  spec.metadata["rubygems_mfa_required"] = "true"
end

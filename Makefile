# The two commands a fresh machine needs: `make demo` (the quick start, mock mode) and
# `make test` (lint, the offline gem build, local Kafka and Cassandra, Rust tests, RSpec last).
# Both install what is missing.

CARGO_TARGET_DIR ?= /var/cache/prosody/target
export CARGO_TARGET_DIR
CARGO := cargo
RUBY_FILES := $(shell git ls-files '*.rb' 'Rakefile' '*.gemspec' 'Gemfile' 2>/dev/null)

.PHONY: setup build demo test lint services services-stop test-rust test-ruby test-ruby-async2 test-gc-stress test-gem bench bench-timers bench-scheduler bench-defer bench-dedup gem clean

setup:
	@dev/setup

build: setup
	rake compile

demo: build
	ruby -Ilib examples/quick_start.rb

test: lint test-gem services test-rust test-ruby test-ruby-async2 test-gc-stress

# Apache Kafka and Apache Cassandra on 127.0.0.1 from Maven Central jars (reused when running).
services: setup
	dev/services start all
	dev/services wait all

services-stop:
	dev/services stop all

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	@for f in $(RUBY_FILES); do ruby -wc $$f >/dev/null || exit 1; done
	rubocop
	$$(command -v rbs || command -v rbs3.1) -r logger -r monitor -I sig validate >/dev/null

# The real-service tests are marked #[ignore] so a bare `cargo test` names them as not run;
# here they run, after `services`, and fail if a service is down.
test-rust: setup
	$(CARGO) test --release -p prosody-core -- --include-ignored

test-ruby: build
	rspec

# The RSpec suite again with async 2.24 (the last 2.x for Ruby 3.1), installed offline from
# ../shared/gems/async-2 into a cache folder; skipped, saying so, where that folder is absent.
ASYNC2_GEMS := ../shared/gems/async-2
ASYNC2_HOME := /var/cache/prosody/async-2
test-ruby-async2: build
	@if [ ! -d $(ASYNC2_GEMS) ]; then \
	  echo "test-ruby-async2: skipped: $(ASYNC2_GEMS) is absent (async 2 gems for an offline install)"; \
	else \
	  [ -d $(ASYNC2_HOME)/gems/async-2.24.0 ] || (cd $(ASYNC2_GEMS) && \
	    GEM_HOME=$(ASYNC2_HOME) gem install --local --no-document async-2.24.0.gem >/dev/null) && \
	  GEM_PATH="$(ASYNC2_HOME):$$(gem env gempath)" ruby -e 'require "async"; \
	    abort("async 2 is not the one activated: #{Async::VERSION}") unless Async::VERSION.start_with?("2."); \
	    puts "RSpec with async #{Async::VERSION}"' && \
	  GEM_PATH="$(ASYNC2_HOME):$$(gem env gempath)" rspec; \
	fi

# Consume, produce, timers and failures under GC.stress (spec/gc_stress_spec.rb, under a minute).
test-gc-stress: build
	PROSODY_GC_STRESS=1 rspec --tag gc_stress

# Builds the gem and installs it offline into a scratch directory, then loads it from there.
test-gem: build
	rm -rf /tmp/prosody-gem-check && mkdir -p /tmp/prosody-gem-check
	gem build prosody.gemspec -o /tmp/prosody-gem-check/prosody.gem
	gem install --local --no-document --ignore-dependencies --install-dir /tmp/prosody-gem-check/home \
	  /tmp/prosody-gem-check/prosody.gem
	cd /tmp && GEM_HOME=/tmp/prosody-gem-check/home \
	  GEM_PATH="/tmp/prosody-gem-check/home:$$(ruby -e 'print Gem.path.join(":")')" ruby -e \
	  'require "prosody"; c = Prosody::Client.new(mock: true, send_timeout: 10); c.send_message("gem-check", "k", {"ok" => true}); puts "installed gem works: #{$$LOADED_FEATURES.grep(/prosody\.so/).first}"'

# Runs the consume benchmark, the engine alone (a Rust runner completing each job at once, against
# a raw librdkafka consumer), prefetch memory (1M records on 32 partitions), the produce benchmark, tracing's cost (Jaeger) and latency at a
# steady 1,000 msg/s (local Kafka and Cassandra) with async 1.30; then consume and produce with
# async 2 where ../shared/gems/async-2 is (installed as for test-ruby-async2).
bench: build
	$(CARGO) build --release -p prosody-core --example raw_consumer --example raw_producer --example engine_alone
	ruby -Ilib -retc bench/consume.rb
	$(CARGO_TARGET_DIR)/release/examples/engine_alone 200000 4
	ruby -Ilib bench/memory.rb 1000000 32
	ruby -Ilib bench/produce.rb
	dev/services start all && dev/services wait all
	ruby -Ilib bench/tracing.rb
	ruby -Ilib bench/latency.rb
	@if [ -d $(ASYNC2_GEMS) ]; then \
	  [ -d $(ASYNC2_HOME)/gems/async-2.24.0 ] || (cd $(ASYNC2_GEMS) && \
	    GEM_HOME=$(ASYNC2_HOME) gem install --local --no-document async-2.24.0.gem >/dev/null) && \
	  GEM_PATH="$(ASYNC2_HOME):$$(gem env gempath)" ruby -Ilib -retc bench/consume.rb && \
	  GEM_PATH="$(ASYNC2_HOME):$$(gem env gempath)" ruby -Ilib bench/produce.rb; \
	else echo "bench: async 2 skipped: $(ASYNC2_GEMS) is absent"; fi

# Cost of one fair-scheduler grant with 1k, 10k and 100k events waiting.
bench-scheduler: setup
	$(CARGO) run --release -p prosody-core --example scheduler_bench

# Deferred retry's drain: 10,000 deferred messages over 100 keys against the local Kafka and
# Cassandra (started if needed); prints msg/s and the ratio to the 5,000 msg/s target.
bench-defer: setup services
	$(CARGO) run --release -p prosody-core --example defer_drain

# Deduplication against the local Kafka and Cassandra (started if needed): msg/s with it on
# (a Cassandra read and write per message) and off.
bench-dedup: build services
	ruby -Ilib bench/dedup.rb

# Timers in memory, and in the local Cassandra (started if needed).
bench-timers: build services
	ruby -Ilib bench/timers.rb

gem:
	gem build prosody.gemspec

clean:
	rm -f lib/prosody/prosody.so prosody-*.gem

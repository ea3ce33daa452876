# frozen_string_literal: true

require "open3"
require "rbconfig"
require "tmpdir"

# What the README samples need to run, and how the spec finds them. Each sample runs in a child
# Ruby of its own, in mock mode (PROSODY_MOCK=true) and in a temporary directory.
module ReadmeSamples # rubocop:disable Metrics/ModuleLength -- mostly the children's Ruby, in heredocs
  README = File.expand_path("../README.md", __dir__)
  LIB = File.expand_path("../lib", __dir__)
  SECONDS = 30
  # The opentelemetry gems cannot be installed here (no RubyGems): the tracing samples load a
  # stand-in that implements just the calls they (and Prosody) make.
  OPENTELEMETRY = File.expand_path("support/opentelemetry_stand_in", __dir__)

  # Samples that are fragments get their surroundings here, and samples that only define a handler
  # class are exercised here: +before+ runs first (stand-ins for what the sample takes as given),
  # +after+ last (sends the handler messages through ReadmeHarness and checks what it did). The
  # key is a piece of text that exactly one sample contains.
  # Gemfile lines: Bundler's Gemfile DSL evaluates them (Kernel#gem would look for an installed gem).
  GEMFILE = {
    before: <<~'RUBY'
      require "bundler"
      GEMFILE = Bundler::Dsl.new
      def self.gem(*args, **options) = GEMFILE.gem(*args, **options)
    RUBY
  }.freeze

  STAND_INS = {
    'gem "prosody"' => GEMFILE,
    # Tracing: the Gemfile lines, as for Prosody's.
    "gem 'opentelemetry-sdk'" => GEMFILE,
    # Tracing: the SDK set-up, against the stand-in gems.
    "OpenTelemetry::SDK.configure" => {
      before: <<~RUBY,
        $LOAD_PATH.unshift(#{OPENTELEMETRY.dump})
      RUBY
      after: <<~'RUBY'
        raise "expected the service name set" unless OpenTelemetry::SDK.configuration.service_name == "my-service-name"
        raise "expected a tracer, got #{tracer.inspect}" unless tracer.respond_to?(:in_span)
      RUBY
    },
    # Tracing: the handler starts its own span in each call (with the stand-in gem).
    "class MyHandler < Prosody::EventHandler" => {
      before: <<~RUBY,
        $LOAD_PATH.unshift(#{OPENTELEMETRY.dump})
        require "opentelemetry"
      RUBY
      after: <<~'RUBY'
        ReadmeHarness.run!(MyHandler, { "id" => 7 })
        span = OpenTelemetry::SPANS.pop(true)
        raise "expected a process-message span, got #{span.inspect}" unless span.name == "process-message"
        raise "expected its event, got #{span.events}" unless span.events == [["message.received", { "message.payload" => '{"id":7}' }]]
      RUBY
    },
    # Consuming: Billing is the application's payment service.
    "Billing.charge" => {
      before: <<~'RUBY',
        module Billing
          def self.charges = (@charges ||= [])
          def self.charge(id, amount) = charges << [id, amount]
        end
      RUBY
      after: <<~'RUBY'
        ReadmeHarness.run!(OrderHandler, { "id" => 7, "amount" => 1999 })
        raise "expected one charge of 1999 for order 7, got #{Billing.charges}" unless Billing.charges == [[7, 1999]]
      RUBY
    },
    # Failures: an order without an id fails permanently, one with an id succeeds.
    "permanent :on_message, TypeError" => {
      after: <<~'RUBY'
        (_, _, fine), (_, _, failed) = ReadmeHarness.run(OrderHandler, { "id" => 7 }, {})
        raise fine if fine.is_a?(Exception)
        raise "expected Prosody::PermanentError, got #{failed.inspect}" unless failed.is_a?(Prosody::PermanentError)
      RUBY
    },
    # Timers: Reminders is the application's notification service. on_message runs as written;
    # on_timer runs through a subclass that schedules a timer due now (the sample's is 30 minutes away).
    "Reminders." => {
      before: <<~'RUBY',
        module Reminders
          def self.delivered = (@delivered ||= [])
          def self.deliver(key) = delivered << key
        end
      RUBY
      after: <<~'RUBY'
        ReadmeHarness.run!(OrderHandler, { "status" => "created" }, { "status" => "paid" })
        due_now = Class.new(OrderHandler) { def on_message(context, _message) = context.schedule(Time.now) }
        ReadmeHarness.run!(due_now, { "status" => "created" }, calls: 2)
        raise "expected a reminder for order-1, got #{Reminders.delivered}" unless Reminders.delivered == ["order-1"]
      RUBY
    },
    # Producing: the sample's client.
    'client.send_message("orders", "customer-42"' => {
      before: <<~'RUBY'
        client = Prosody::Client.new(mock: true, source_system: "readme")
      RUBY
    },
    # Deduplication: the sample's client reads what it sent; key1's duplicate is skipped.
    '"Hello again!"' => {
      before: <<~'RUBY',
        require "timeout"
      RUBY
      after: <<~'RUBY'
        seen = Queue.new
        client.subscribe(Class.new(Prosody::EventHandler) { define_method(:on_message) { |_, m| seen << [m.key, m.payload] } }.new)
        %w[key1 key2].each { |key| client.send_message("my-topic", key, { "marker" => true }) }
        got = Array.new(4) { Timeout.timeout(20) { seen.pop } }.group_by(&:first).transform_values { |c| c.map(&:last) }
        want = { "key1" => [{ "id" => "msg-123", "content" => "Hello!" }, { "marker" => true }],
                 "key2" => [{ "id" => "msg-123", "content" => "Hello!" }, { "marker" => true }] }
        raise "expected #{want}, got #{got}" unless got == want
        raise "expected one duplicate, got #{client.skipped_events}" unless client.skipped_events[:duplicate] == 1
        client.unsubscribe
      RUBY
    },
    # Filtering: the sample's client gets the README's six payloads from another producer.
    'allowed_events: ["user.", "account."]' => {
      before: <<~'RUBY',
        require "timeout"
      RUBY
      after: <<~'RUBY'
        seen = Queue.new
        client.subscribe(Class.new(Prosody::EventHandler) { define_method(:on_message) { |_, m| seen << m.payload } }.new)
        producer = Prosody::Client.new(mock: true, source_system: "readme-producer")
        sent = [{ "type" => "user.created" }, { "type" => "admin.user.created" }, { "type" => "account.deleted" },
                { "type" => "my.account.deleted" }, { "type" => "notification" }, { "id" => 1 }]
        sent.each { |payload| producer.send_message("my-topic", "k", payload) }
        got = Array.new(3) { Timeout.timeout(20) { seen.pop } }
        want = [{ "type" => "user.created" }, { "type" => "account.deleted" }, { "id" => 1 }]
        raise "expected #{want}, got #{got}" unless got == want
        raise "expected three filtered, got #{client.skipped_events}" unless client.skipped_events[:filtered] == 3
        client.unsubscribe
      RUBY
    }
  }.freeze

  # Loaded before every sample: runs a handler class on the mock cluster.
  HARNESS = <<~'RUBY'
    module ReadmeHarness
      # Subscribes a new +handler_class+ to a topic of its own, sends +payloads+ (all with key
      # "order-1", so in order), and waits until +calls+ on_message/on_timer calls returned or
      # raised. Returns [[method, key, value or exception], ...] in the order they finished.
      def self.run(handler_class, *payloads, calls: payloads.size)
        finished = Queue.new
        probe = Class.new(handler_class) do
          %i[on_message on_timer].each do |name|
            next if handler_class.instance_method(name).owner == Prosody::EventHandler

            define_method(name) do |context, event|
              super(context, event).tap { |value| finished << [name, event.key, value] }
            rescue Exception => e
              finished << [name, event.key, e]
              raise
            end
          end
        end
        @runs = (@runs || 0) + 1
        topic = "readme-#{@runs}"
        client = Prosody::Client.new(mock: true, group_id: topic, source_system: "readme-producer",
                                     subscribed_topics: topic, shutdown_timeout: 2, send_timeout: 10)
        client.subscribe(probe.new)
        payloads.each { |payload| client.send_message(topic, "order-1", payload) }
        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 20
        Array.new(calls) do
          finished.pop(true)
        rescue ThreadError
          raise "#{handler_class}: #{calls} handler calls expected, timed out" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

          sleep 0.01
          retry
        end
      ensure
        client&.unsubscribe
      end

      # Like run, and raises the first exception a handler call raised.
      def self.run!(...)
        run(...).tap { |outcomes| outcomes.each { |_, _, value| raise value if value.is_a?(Exception) } }
      end
    end
  RUBY

  # Evaluates each part in the top-level binding, so that a part sees the locals of the ones before.
  # ARGV is emptied first: it names the parts, and the samples (RSpec's autorun) would read it.
  RUNNER = <<~'RUBY'
    require "prosody"
    parts = ARGV.each_slice(3).to_a
    ARGV.clear
    parts.each { |file, label, line| eval(File.read(file), TOPLEVEL_BINDING, label, Integer(line)) }
  RUBY

  Sample = Struct.new(:line, :code)

  # The ```ruby blocks of README.md, in order, with the line of their first code line.
  def self.samples
    samples = []
    current = nil
    File.readlines(README).each.with_index(1) do |text, number|
      if current.nil?
        current = Sample.new(number + 1, +"") if text.match?(/\A\s*```ruby\s*\z/)
      elsif text.match?(/\A\s*```\s*\z/)
        samples << current
        current = nil
      else
        current.code << text
      end
    end
    raise "README.md: the ```ruby block at line #{current.line - 1} is not closed" if current

    samples
  end

  def self.stand_ins(sample)
    STAND_INS.select { |marker, _| sample.code.include?(marker) }.values
  end

  # Runs +sample+ in a child Ruby; returns [output, status].
  def self.run(sample)
    Dir.mktmpdir("readme-sample") do |dir|
      parts = [["harness", HARNESS, "spec/readme_samples_spec.rb (harness)", 1]]
      stand_ins(sample).each { |s| parts << ["before", s[:before], "spec/readme_samples_spec.rb (stand-in)", 1] }
      parts << ["sample", sample.code, README, sample.line]
      stand_ins(sample).each { |s| parts << ["after", s[:after], "spec/readme_samples_spec.rb (exercise)", 1] }
      args = parts.each_with_index.flat_map do |(name, code, label, line), i|
        next [] unless code

        file = File.join(dir, "#{i}-#{name}.rb")
        File.write(file, code)
        [file, label, line.to_s]
      end
      # KILL: TERM would reach a sample's own trap handler.
      Open3.capture2e(child_env, "timeout", "-s", "KILL", SECONDS.to_s,
                      RbConfig.ruby, "-I", LIB, "-e", RUNNER, "--", *args, chdir: dir)
    end
  end

  # Mock mode, and nothing from the parent that would change the child: no other PROSODY_*
  # variable, no Bundler or RSpec options. The default send_timeout, as a user has it.
  def self.child_env
    env = ENV.keys.grep(/\APROSODY_/).to_h { |key| [key, nil] }
    env.merge("PROSODY_MOCK" => "true", "RUBYOPT" => nil, "RUBYLIB" => nil, "SPEC_OPTS" => nil)
  end
end

# Every ```ruby block of README.md runs as written (with the stand-ins above), each in a fresh
# Ruby process in mock mode; one that raises, exits non-zero or hangs fails with its line number.
RSpec.describe "README samples", order: :defined do
  samples = ReadmeSamples.samples

  it "finds the samples, and each stand-in belongs to exactly one" do
    puts "\nREADME.md: #{samples.size} ruby samples, at lines #{samples.map(&:line).join(', ')}"
    expect(samples.size).to be > 0
    ReadmeSamples::STAND_INS.each_key do |marker|
      expect(samples.count { |sample| sample.code.include?(marker) })
        .to eq(1), "stand-in #{marker.inspect} should match exactly one README sample"
    end
  end

  samples.each do |sample|
    it "README.md:#{sample.line} runs" do
      output, status = ReadmeSamples.run(sample)
      outcome = status.signaled? && status.termsig == 9 ? "timed out after #{ReadmeSamples::SECONDS}s" : status.to_s
      expect(status.success?).to be(true), <<~MESSAGE
        README.md:#{sample.line}: the sample failed (#{outcome}); its output:
        #{output.length > 6000 ? "...#{output[-6000..]}" : output}
      MESSAGE
    end
  end
end

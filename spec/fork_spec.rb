# frozen_string_literal: true

require "open3"
require "rbconfig"

# After fork, a client inherited from the parent raises Prosody::ClientError on every call (and
# is dropped without touching the parent's threads), the child exits normally, a client created
# in the child consumes and produces, and the parent's clients keep working
# (spec/scripts/fork_scenario.rb does the forking, in a process of its own).
RSpec.describe "Clients and fork" do
  let(:scenario) { File.expand_path("scripts/fork_scenario.rb", __dir__) }
  let(:steps) do
    ["OK parent before fork", "OK child exited normally", "OK inherited clients raise",
     "OK child's own client consumes and produces", "OK parent after fork"]
  end

  def run_scenario(*args)
    out, err, status = Open3.capture3("timeout", "-s", "KILL", "150", RbConfig.ruby, scenario, *args)
    expect(status).to be_success, "exit #{status.inspect}\n#{out}\n#{err}"
    expect(out.lines.map(&:chomp)).to eq(steps)
    expect(err).not_to match(/panicked|\[BUG\]|terminate unexpectedly/)
  end

  it "works on the mock cluster" do
    run_scenario("mock")
  end

  it "works on the local broker", :kafka do
    run_scenario("kafka", KafkaHelpers::BOOTSTRAP)
  end
end

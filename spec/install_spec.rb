# frozen_string_literal: true

require "fileutils"
require "open3"
require "rbconfig"
require "tmpdir"

# `require "prosody"` from a checkout whose native extension was never built (a git checkout, or
# Bundler's path:/git: sources) fails with a LoadError that says how to build it.
RSpec.describe "Loading prosody without its native extension" do
  # Requires prosody in a child Ruby whose only copy of lib/ is +lib_dir+; returns [output, status].
  def require_prosody_from(lib_dir)
    Open3.capture2e({ "RUBYOPT" => nil, "RUBYLIB" => nil }, "timeout", "30", RbConfig.ruby, "-I", lib_dir,
                    "-e", 'require "prosody"; puts "loaded"')
  end

  # A copy of lib/ without the compiled extension, in a temporary directory.
  def lib_copy(dir)
    lib = File.join(dir, "lib")
    FileUtils.cp_r(File.expand_path("../lib", __dir__), dir)
    FileUtils.rm_f(File.join(lib, "prosody", "prosody.#{RbConfig::CONFIG['DLEXT']}"))
    lib
  end

  it "raises a LoadError that says to run rake compile, with the original message appended" do
    Dir.mktmpdir do |dir|
      output, status = require_prosody_from(lib_copy(dir))
      expect(status.success?).to be(false)
      expect(output).to include("(LoadError)")
      expect(output).to match(/native extension is not built: run `bundle exec rake compile`.*needs cargo/)
      expect(output).to include("cannot load such file -- prosody/prosody")
      expect(output).not_to include("loaded")
    end
  end

  it "leaves a LoadError from a broken extension as it is" do
    Dir.mktmpdir do |dir|
      lib = lib_copy(dir)
      File.write(File.join(lib, "prosody", "prosody.#{RbConfig::CONFIG['DLEXT']}"), "not a shared object")
      output, status = require_prosody_from(lib)
      expect(status.success?).to be(false)
      expect(output).to include("(LoadError)")
      expect(output).not_to include("rake compile")
    end
  end
end

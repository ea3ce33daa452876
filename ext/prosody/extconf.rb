# frozen_string_literal: true

# Writes a Makefile that builds the native extension with cargo. RubyGems runs this on
# `gem install`; it needs cargo and the headers of Debian's ruby-dev, nothing from RubyGems.
# The build is offline when cargo's registry cache already holds the dependencies.

require "rbconfig"

root = File.expand_path("../..", __dir__)
dlext = RbConfig::CONFIG["DLEXT"]
lib = RbConfig::CONFIG["host_os"].include?("darwin") ? "libprosody.dylib" : "libprosody.so"
target = ENV.fetch("CARGO_TARGET_DIR", File.join(root, "target"))
cargo = ENV.fetch("CARGO", "cargo")
build = "#{cargo} build --release -p prosody --manifest-path #{root}/Cargo.toml"

# RubyGems points sitearchdir at its staging directory through RbConfig.
File.write("Makefile", <<~MAKE)
  sitearchdir = #{RbConfig::CONFIG['sitearchdir']}
  CARGO_TARGET_DIR = #{target}
  export CARGO_TARGET_DIR
  RUBY = #{RbConfig.ruby}
  export RUBY

  all: prosody.#{dlext}

  prosody.#{dlext}:
  \t#{build} --offline || #{build}
  \tcp $(CARGO_TARGET_DIR)/release/#{lib} prosody.#{dlext}

  install: prosody.#{dlext}
  \tmkdir -p $(sitearchdir)/prosody
  \tcp prosody.#{dlext} $(sitearchdir)/prosody/prosody.#{dlext}
  \t#{ENV.key?('CARGO_TARGET_DIR') ? 'true' : "rm -rf #{File.join(root, 'target')}"}

  clean:
  \trm -f prosody.#{dlext}
MAKE

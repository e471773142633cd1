# Shoal: containerd remote snapshotter.
#
#   make demo         install deps, build, run an image through Shoal, clean up
#   make test         deps + build + unit/integration tests + conformance + e2e
#                     + a short fuzz pass (with SHOAL_REQUIRE_FUSE=1: a FUSE
#                     test that cannot mount fails instead of skipping)
#   make build        cargo build --release (target/release/shoal-snapshotter, shoal)
#   make unit         cargo test --workspace --release
#   make conformance  containerd 1.6's snapshotter test suite against Shoal
#   make e2e          real containerd + registry + images, Shoal vs overlayfs,
#                     lazy pulls of eStargz/zstd:chunked images, shoal pull,
#                     faults injected by a proxy in front of the registry,
#                     lazy layers surviving daemon restarts, the chunk cache,
#                     shoal convert round trips and any-client lazy pulls,
#                     startup profiles (python3 image), layer poisoning
#                     through the chain ID (identity check, quarantine),
#                     Kubernetes' CRI through Shoal's image-service proxy
#                     (private images, pods, restart; about 1 min)
#   make fuzz         every fuzz target for FUZZ_SECONDS each (default 60;
#                     docs/fuzzing.md); make fuzz-short: FUZZ_SHORT_SECONDS (12)
#   make bench        lazy-pull benchmark: Debian+python3 over a 100 Mbit/s link
#                     (BENCH_ARGS="--rate 1gbit --runs 3" passes options)
#   make bench-read   read throughput through FUSE vs an unpacked layer
#                     (cold/warm ratios) and the daemon's RSS
#   make bench-identity  cost of the layer identity check: bytes and time
#                     with [remote] verify_layers on and off
#   make deps         the Debian 12 packages the above need (root)
#
# Everything except `build` and `unit` runs as root on Debian 12.

SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

CARGO ?= cargo
SNAPSHOTTER := target/release/shoal-snapshotter

.PHONY: all build unit test conformance e2e demo deps clean
.PHONY: bench bench-read bench-identity fuzz fuzz-short

FUZZ_SECONDS ?= 60
FUZZ_SHORT_SECONDS ?= 12

all: build

deps:
	scripts/deps.sh

build:
	$(CARGO) build --release --bins

unit:
	$(CARGO) test --workspace --release

conformance: build
	tests/conformance/run.sh $(SNAPSHOTTER)

e2e: build
	tests/e2e/run.sh --no-build
	tests/e2e/lazy.sh --no-build
	tests/e2e/pull.sh --no-build
	tests/e2e/faults.sh --no-build
	tests/e2e/restart.sh --no-build
	tests/e2e/cache.sh --no-build
	tests/e2e/convert.sh --no-build
	tests/e2e/profile.sh --no-build
	tests/e2e/poison.sh --no-build
	$(CARGO) build --release -p shoal-snapshotter --example cri-client
	tests/e2e/cri.sh --no-build
	tests/e2e/p2p.sh --no-build

test: deps build
	SHOAL_REQUIRE_FUSE=1 $(CARGO) test --workspace --release
	tests/conformance/run.sh $(SNAPSHOTTER)
	tests/e2e/run.sh --no-build
	tests/e2e/lazy.sh --no-build
	tests/e2e/pull.sh --no-build
	tests/e2e/faults.sh --no-build
	tests/e2e/restart.sh --no-build
	tests/systemd/verify.sh $(SNAPSHOTTER)
	tests/e2e/cache.sh --no-build
	tests/e2e/convert.sh --no-build
	tests/e2e/profile.sh --no-build
	tests/e2e/poison.sh --no-build
	$(CARGO) build --release -p shoal-snapshotter --example cri-client
	tests/e2e/cri.sh --no-build
	tests/e2e/p2p.sh --no-build
	python3 tests/deploy/check.py
	tests/deploy/schema.sh
	snapshotter/fuzz/run.sh $(FUZZ_SHORT_SECONDS)

fuzz:
	snapshotter/fuzz/run.sh $(FUZZ_SECONDS)

fuzz-short:
	snapshotter/fuzz/run.sh $(FUZZ_SHORT_SECONDS)

demo:
	scripts/demo.sh

bench: build
	tests/bench/lazy-pull.sh --no-build $(BENCH_ARGS)

bench-identity: build
	tests/bench/identity.sh --no-build $(BENCH_ARGS)

bench-read: build
	tests/bench/read.sh --no-build $(BENCH_ARGS)

clean:
	$(CARGO) clean

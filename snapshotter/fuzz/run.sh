#!/usr/bin/env bash
# Builds the fuzz targets and runs each for SECONDS (docs/fuzzing.md).
#
#   snapshotter/fuzz/run.sh SECONDS [TARGET...]
#
# Installs cargo-fuzz if it is missing. New inputs go to corpus/TARGET (not
# committed); the committed seeds in seeds/TARGET are read, never written.
# A crash stops the run with a non-zero status and leaves the input in
# artifacts/TARGET/. Ends with one line per target: executions, coverage.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true

# cargo fuzz passes nightly-only flags to rustc; the toolchain is stable.
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

# Release with overflow checks and debug assertions, so an arithmetic
# overflow is a crash. No sanitizer: the parsers are safe Rust, and ASan
# would double the build time on a 2-core CI machine.
build=(-O -a -s none --codegen-units 16)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

start=$(date +%s)
cargo fuzz build "${build[@]}"
echo "fuzz: built ${#targets[@]} targets in $(($(date +%s) - start)) s"

mkdir -p logs
bin=target/$(rustc -vV | sed -n 's/^host: //p')/release
bin=$PWD/$bin
summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "fuzz: $t for ${secs} s"
    # The binary directly: `cargo fuzz run` would re-check the build each time.
    if ! (cd "artifacts/$t" && "$bin/$t" -artifact_prefix=./ \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 \
        "../../corpus/$t" "../../seeds/$t") >"logs/$t.log" 2>&1; then
        tail -n 40 "logs/$t.log"
        echo "fuzz: $t FAILED; the input is in snapshotter/fuzz/artifacts/$t/ (docs/fuzzing.md)" >&2
        exit 1
    fi
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "logs/$t.log" | tail -n 1)
    summary+=("$(printf '%-15s %s' "$t" "$done_line")")
done
echo "fuzz: all ${#targets[@]} targets passed, $(($(date +%s) - start)) s in all"
printf '%s\n' "${summary[@]}"

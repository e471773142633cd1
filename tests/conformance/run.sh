#!/usr/bin/env bash
# Runs containerd 1.6's snapshotter conformance suite against shoal-snapshotter.
#
#   tests/conformance/run.sh [BIN] [SUBTEST_REGEXP]
#
# BIN defaults to target/release/shoal-snapshotter. The suite is built in GOPATH
# mode from Debian's packaged containerd sources, so it needs no network beyond
# apt. Needs root: the suite mounts what the snapshotter returns.
# Prints one line per subtest and ends with
#   conformance: N passed, N failed, N skipped
# Exits 0 only when nothing failed and something passed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(readlink -f "${1:-$here/../../target/release/shoal-snapshotter}")
filter=${2:-.}
[ -x "$bin" ] || { echo "conformance: $bin is not an executable (build it first)" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "conformance: run as root (the suite mounts overlays)" >&2; exit 2; }

pkgs=()
command -v go >/dev/null || pkgs+=(golang-go)
src=/usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite
[ -d "$src" ] || pkgs+=(golang-github-containerd-containerd-dev)
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "conformance: installing ${pkgs[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi

work=${SHOAL_CONFORMANCE_WORK:-/var/tmp/shoal-conformance}
mkdir -p "$work/src/shoalconformance"
cp "$here/suite_test.go" "$work/src/shoalconformance/"
(cd "$work/src/shoalconformance" &&
  GO111MODULE=off GOPATH="$work:/usr/share/gocode" GOCACHE="$work/gocache" \
    go test -c -o "$work/shoal-conformance.test" .)

log="$work/last-run.log"
set +e
(cd "$work" && SHOAL_SNAPSHOTTER_BIN="$bin" timeout "${SHOAL_CONFORMANCE_TIMEOUT:-900}" \
  ./shoal-conformance.test -test.root -test.v -test.run "TestShoal/($filter)" >"$log" 2>&1)
rc=$?
set -e
grep -E -- '^\s+--- (PASS|FAIL|SKIP)' "$log" | sed 's/^ *//' || true
count() { grep -cE -- "^\s+--- $1" "$log" || true; }
passed=$(count PASS); failed=$(count FAIL); skipped=$(count SKIP)
if [ "$failed" -gt 0 ]; then
  echo "--- failures (full log: $log):"
  grep -E -B2 -A15 -- '--- FAIL' "$log" | head -200
elif [ "$rc" -ne 0 ]; then
  echo "--- suite exited $rc; last lines of $log:"; tail -30 "$log"; failed=1
fi
echo "conformance: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]

#!/usr/bin/env bash
# Checks systemd/shoal-snapshotter.service with `systemd-analyze verify`.
#
# Usage: tests/systemd/verify.sh BINARY
#
# verify insists that ExecStart= names an existing executable, so it runs on a
# temporary copy of the unit whose ExecStart= points at BINARY (for example
# target/release/shoal-snapshotter); nothing is installed. verify exits 0 even
# for unknown keys and bad values, so any output at all is a failure. A few
# properties that the design relies on are checked as well.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 BINARY" >&2; exit 2; }
bin=$(realpath -e -- "$1") || { echo "verify.sh: no such binary: $1" >&2; exit 2; }
[ -x "$bin" ] || { echo "verify.sh: not executable: $bin" >&2; exit 2; }
case $bin in *[[:space:]]*) echo "verify.sh: binary path must not contain spaces: $bin" >&2; exit 2 ;; esac

unit=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/systemd/shoal-snapshotter.service
tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
# The copy must keep the unit's name: verify derives the unit type from it.
copy=$tmp/shoal-snapshotter.service

n=0
while IFS= read -r line || [ -n "$line" ]; do
  case $line in
    ExecStart=*) printf 'ExecStart=%s\n' "$bin"; n=$((n + 1)) ;;
    *) printf '%s\n' "$line" ;;
  esac
done <"$unit" >"$copy"
[ "$n" -eq 1 ] || { echo "verify.sh: expected exactly one ExecStart= line, found $n" >&2; exit 1; }

fail=0
if ! out=$(systemd-analyze verify "$copy" 2>&1); then
  fail=1
fi
if [ -n "$out" ]; then
  printf '%s\n' "$out" >&2
  fail=1
fi

# Design rules (docs/operations.md, BRIEF section 6 lesson 2).
need() { grep -Eq "$1" "$unit" || { echo "verify.sh: unit lacks: $1" >&2; fail=1; }; }
refuse() { ! grep -Eq "$1" "$unit" || { echo "verify.sh: unit must not have: $1" >&2; fail=1; }; }
need '^Type=notify$'
need '^Before=containerd\.service$'
need '^WantedBy=.*containerd\.service'
need '^RuntimeDirectoryPreserve=yes$'
# FUSE session handover (docs/operations.md, "Restarts and upgrades").
need '^FileDescriptorStoreMax=[1-9]'
need '^Restart=always$'
need '^KillMode=mixed$'
# Memory limits (docs/operations.md, "Memory limits"): an OOM kill must end
# in an automatic restart, which keeps the fd store.
need '^MemoryMax=[1-9]'
need '^MemoryHigh=[1-9]'
need '^OOMPolicy=stop$'
refuse '^[^#]*network-online\.target'
refuse '^(MountFlags|PrivateMounts|ProtectSystem|ProtectHome|PrivateTmp|PrivateDevices|ReadWritePaths|ReadOnlyPaths|DeviceAllow|Delegate)='

if [ "$fail" -ne 0 ]; then
  echo "verify.sh: FAIL: $unit" >&2
  exit 1
fi
echo "verify.sh: ok: $unit"

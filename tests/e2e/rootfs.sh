#!/usr/bin/env bash
# Makes sure the Debian bookworm + python3 root filesystem that tests and
# benchmarks build images from exists, building it with debootstrap when it
# does not (the same path and marker as tests/bench/lazy-pull.sh, so each
# reuses the other's). Prints its path.
#
#   tests/e2e/rootfs.sh
set -euo pipefail
CACHE=${SHOAL_BENCH_CACHE:-/var/cache/shoal-bench}
MIRROR=${SHOAL_BENCH_MIRROR:-http://deb.debian.org/debian}
ROOTFS=$CACHE/rootfs-bookworm-python3
if ! { [ -f "$CACHE/rootfs.done" ] && [ -x "$ROOTFS/usr/bin/python3" ]; }; then
  echo "rootfs.sh: building $ROOTFS with debootstrap (downloads ~100 MB, a few minutes)" >&2
  rm -rf --one-file-system "$ROOTFS.partial" "$ROOTFS"
  mkdir -p "$CACHE"
  debootstrap --variant=minbase --include=python3 bookworm "$ROOTFS.partial" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -n 20 "$CACHE/debootstrap.log" >&2; echo "rootfs.sh: debootstrap failed" >&2; exit 1; }
  chroot "$ROOTFS.partial" python3 -c pass
  mv "$ROOTFS.partial" "$ROOTFS"
  touch "$CACHE/rootfs.done"
fi
echo "$ROOTFS"

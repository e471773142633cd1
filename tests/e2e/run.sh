#!/usr/bin/env bash
# Shoal's end-to-end test: real containerd, a real registry, real images, as a
# user would run them. Needs root. Prints one PASS/FAIL line per check and
# ends with `e2e: N passed, M failed`; exits non-zero if anything failed.
#
#   tests/e2e/run.sh [--no-build] [--overlayfs-only]
#
#   --no-build        use the existing target/release binaries
#   --overlayfs-only  run every flow through containerd's overlayfs only (checks
#                     the test world itself; Shoal is not started)
#
# What it checks, per image (busybox:1, layered:1) and snapshotter:
#   pull, the program's output, and the tree the container sees (paths, types,
#   modes, owners, sizes, mtimes, content hashes, link targets, hardlink
#   groups) against umoci's own unpack of the image. Then Shoal against
#   overlayfs: identical trees and identical committed snapshots. Then Shoal
#   alone: the rootfs really comes from Shoal's root, writes stay in the
#   container, `ctr images mount` (a View-style mount on the host), a daemon
#   restart, and garbage collection removing every snapshot.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

build=1
snapshotters=(overlayfs shoal)
for arg in "$@"; do
  case $arg in
    --no-build) build=0 ;;
    --overlayfs-only) snapshotters=(overlayfs); E2E_SHOAL_BIN= ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

# shellcheck source=tests/e2e/lib.sh
source "$here/lib.sh"

e2e_checks_begin e2e

[ "$build" = 0 ] || e2e_build

if [ -n "$E2E_SHOAL_BIN" ]; then
  cli="$repo/target/release/shoal"
  if out=$("$cli" version 2>&1); then
    pass "cli: shoal version ($out)"
  else
    fail "cli: shoal version" "$out"
  fi
fi

E2E_EXIT_HOOK=summary
e2e_world_start
pass "world: registry $E2E_REGISTRY, containerd and ${E2E_SHOAL_BIN:+shoal-snapshotter }under $E2E_DIR"

images="$E2E_DIR/images"
if out=$("$here/images.sh" "$images" "$E2E_REGISTRY" 2>&1); then
  pass "images: built and pushed busybox:1 and layered:1"
else
  fail "images: build and push" "$(tail -n 20 <<<"$out")"
  exit 1
fi

mkdir -p "$E2E_DIR/trees"
for name in busybox layered; do
  e2e_tree_host "$images/ref/$name/rootfs" >"$E2E_DIR/trees/ref-$name.txt"
done

run_id=0
# crun SNAPSHOTTER REF CMD...: ctr run --rm with a fresh container id.
crun() {
  local sn=$1 ref=$2
  shift 2
  run_id=$((run_id + 1))
  E2E_CTR_TIMEOUT=120 e2e_ctr run --rm --snapshotter "$sn" "$ref" "e2e-$sn-$run_id" "$@"
}

# diff_check NAME EXPECTED-FILE ACTUAL-FILE
diff_check() {
  local d
  if d=$(diff -u "$2" "$3"); then
    pass "$1"
  else
    fail "$1" "$(head -n 40 <<<"$d")"
  fi
}

# committed SNAPSHOTTER: the sorted keys of its committed snapshots.
committed() {
  e2e_ctr snapshots --snapshotter "$1" ls | awk 'NR > 1 && $NF == "Committed" { print $1 }' | LC_ALL=C sort
}

for sn in "${snapshotters[@]}"; do
  for name in busybox layered; do
    ref=$(cat "$images/$name.ref")
    t0=$SECONDS
    if out=$(e2e_ctr image pull --plain-http --snapshotter "$sn" "$ref" 2>&1); then
      pass "$sn/$name: pull $ref ($((SECONDS - t0))s)"
    else
      fail "$sn/$name: pull $ref" "$(tail -n 20 <<<"$out")"
      continue
    fi
    if crun "$sn" "$ref" sh -c "$(cat "$images/$name.cmd")" >"$E2E_DIR/$sn-$name.out" 2>&1; then
      diff_check "$sn/$name: program output" "$images/$name.out" "$E2E_DIR/$sn-$name.out"
    else
      fail "$sn/$name: run" "$(tail -n 20 "$E2E_DIR/$sn-$name.out")"
    fi
    tree="$E2E_DIR/trees/$sn-$name.txt"
    if e2e_tree_container "$sn" "$ref" "e2e-tree-$sn-$name" >"$tree" 2>"$tree.err" && [ -s "$tree" ]; then
      diff_check "$sn/$name: tree matches umoci unpack ($(wc -l <"$tree") paths)" \
        "$E2E_DIR/trees/ref-$name.txt" "$tree"
    else
      fail "$sn/$name: tree dump" "$(tail -n 20 "$tree.err")"
    fi
  done
done

if [ -z "$E2E_SHOAL_BIN" ]; then
  exit 0
fi

# --- Shoal against overlayfs -------------------------------------------------
for name in busybox layered; do
  if [ -s "$E2E_DIR/trees/shoal-$name.txt" ] && [ -s "$E2E_DIR/trees/overlayfs-$name.txt" ]; then
    diff_check "shoal/$name: tree identical to overlayfs" \
      "$E2E_DIR/trees/overlayfs-$name.txt" "$E2E_DIR/trees/shoal-$name.txt"
  else
    fail "shoal/$name: tree identical to overlayfs" "a tree dump is missing"
  fi
done

committed overlayfs >"$E2E_DIR/committed-overlayfs.txt" 2>&1 || true
if committed shoal >"$E2E_DIR/committed-shoal.txt" 2>&1; then
  n=$(wc -l <"$E2E_DIR/committed-shoal.txt")
  # busybox:1 has 1 layer, layered:1 has 4: five chain IDs in all.
  if [ "$n" -ge 5 ]; then
    diff_check "shoal: snapshots ls lists the same $n committed layers as overlayfs" \
      "$E2E_DIR/committed-overlayfs.txt" "$E2E_DIR/committed-shoal.txt"
  else
    fail "shoal: snapshots ls lists the layers" "expected >= 5 committed, got $n: $(cat "$E2E_DIR/committed-shoal.txt")"
  fi
else
  fail "shoal: snapshots ls" "$(cat "$E2E_DIR/committed-shoal.txt")"
fi

active=$(e2e_ctr snapshots --snapshotter shoal ls | awk 'NR > 1 && $NF != "Committed"')
if [ -z "$active" ]; then
  pass "shoal: no active snapshots left after ctr run --rm"
else
  fail "shoal: no active snapshots left after ctr run --rm" "$active"
fi

busybox_ref=$(cat "$images/busybox.ref")
layered_ref=$(cat "$images/layered.ref")

# The container's root must be an overlay whose layers live under Shoal's root.
if out=$(crun shoal "$layered_ref" cat /proc/self/mountinfo 2>&1) &&
  grep -E '^[0-9]+ [0-9]+ [^ ]+ [^ ]+ / ' <<<"$out" | grep -qF "$E2E_DIR/shoal/"; then
  pass "shoal: container rootfs is an overlay of layers under $E2E_DIR/shoal"
else
  fail "shoal: container rootfs comes from Shoal" "$(grep -E '^[0-9]+ [0-9]+ [^ ]+ [^ ]+ / ' <<<"$out" || tail -n 5 <<<"$out")"
fi

# Writes land in the container's own snapshot, never in the image.
if crun shoal "$busybox_ref" sh -c 'echo x >/bin/e2e-marker && rm /bin/cat' >/dev/null 2>&1 &&
  out=$(crun shoal "$busybox_ref" sh -c 'test ! -e /bin/e2e-marker && test -e /bin/cat && echo clean' 2>&1) &&
  [ "$out" = clean ]; then
  pass "shoal: writes and deletes stay in the container"
else
  fail "shoal: writes and deletes stay in the container" "$out"
fi

# ctr images mount: a snapshot on top of the image, mounted on the host.
mnt="$E2E_DIR/mnt-layered"
mkdir -p "$mnt"
if out=$(E2E_CTR_TIMEOUT=60 e2e_ctr images mount --snapshotter shoal "$layered_ref" "$mnt" 2>&1); then
  e2e_tree_host "$mnt" >"$E2E_DIR/trees/mount-layered.txt" 2>&1 || true
  diff_check "shoal: ctr images mount shows the image tree" \
    "$E2E_DIR/trees/ref-layered.txt" "$E2E_DIR/trees/mount-layered.txt"
  if out=$(E2E_CTR_TIMEOUT=60 e2e_ctr images unmount --rm "$mnt" 2>&1); then
    pass "shoal: ctr images unmount --rm"
  else
    fail "shoal: ctr images unmount --rm" "$out"
  fi
else
  fail "shoal: ctr images mount" "$out"
fi

# Restart: snapshots must come back from Shoal's stored metadata.
e2e_stop_pid shoal
e2e_start_shoal
deadline=$((SECONDS + 30))
until out=$(crun shoal "$busybox_ref" sh -c 'echo after restart' 2>&1); do
  # containerd reconnects with backoff; the first calls may be UNAVAILABLE.
  [ "$SECONDS" -lt "$deadline" ] || break
  sleep 1
done
committed shoal >"$E2E_DIR/committed-shoal-restart.txt" 2>&1 || true
if [ "$out" = "after restart" ] &&
  cmp -s "$E2E_DIR/committed-shoal.txt" "$E2E_DIR/committed-shoal-restart.txt"; then
  pass "shoal: restart keeps every snapshot and runs containers again"
else
  fail "shoal: restart keeps every snapshot and runs containers again" \
    "$out$(diff "$E2E_DIR/committed-shoal.txt" "$E2E_DIR/committed-shoal-restart.txt")"
fi

if out=$(e2e_ctr snapshots --snapshotter shoal usage 2>&1); then
  pass "shoal: snapshots usage"
else
  fail "shoal: snapshots usage" "$out"
fi

# Garbage collection: removing the images must Remove every Shoal snapshot.
if out=$(e2e_ctr images rm --sync "$busybox_ref" "$layered_ref" 2>&1); then
  left=$(e2e_ctr snapshots --snapshotter shoal ls | awk 'NR > 1')
  if [ -z "$left" ]; then
    pass "shoal: ctr images rm --sync garbage-collects every snapshot"
  else
    fail "shoal: ctr images rm --sync garbage-collects every snapshot" "$left"
  fi
else
  fail "shoal: ctr images rm --sync" "$out"
fi


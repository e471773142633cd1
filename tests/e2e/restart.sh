#!/usr/bin/env bash
# End-to-end test: lazily mounted layers survive restarts of shoal-snapshotter
# (kill -9, SIGTERM, a different binary) while a container reads them, with
# real containerd, runc, docker-registry, ctr-remote and FUSE. Runs in the fd
# holder mode (no systemd here). Needs root.
# Prints PASS/FAIL lines and ends with `restart: N passed, M failed`.
#
#   tests/e2e/restart.sh [--no-build] [--kills N]
#
# Checks:
#   - a container loops over a 3-layer eStargz image (busybox, 300 small
#     files, 4 x 8 MiB files read in 64 KiB slices), checksumming every read
#     against sums baked into the image; background fetch is off, so reads
#     of data not fetched yet (and of chunks fetched but not in the page
#     cache) keep reaching the daemon throughout;
#   - kill -9 and restart, N times (default 10): the same FUSE mounts stay
#     (mount ids unchanged, and the daemon logs resumed=true for all 3
#     layers, never a fresh mount) and the loop goes on;
#   - a read the daemon had taken but not answered (registry paused with
#     SIGSTOP) when it was killed is answered by the next daemon
#     (FUSE_NOTIFY_RESEND);
#   - graceful restart (SIGTERM) 3 times: the daemon leaves the mounts to the
#     next one; an "upgrade" to a copy of the binary at another path, and back;
#   - the loop saw no I/O error and no wrong checksum; its task still runs;
#   - boot with the registry down: the daemon starts, containerd's calls
#     succeed, and a new container reading cached files runs;
#   - kept fds whose mounts were removed while the daemon was down are
#     dropped from the holder and the layers mounted afresh;
#   - kept TOCs corrupted while the daemon was down, registry down: the
#     daemon serves, readers of the old mounts get errors within 20 s (never
#     hang), the bad copies are removed, and once the registry is back the
#     layers are mounted again in the background with their TOCs kept anew;
#   - reboot simulation (daemon killed, fd holder killed, every mount under
#     the root removed): the daemon mounts the layers afresh, Stat/List agree,
#     and a new container reads every file correctly.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=1 kills=10
while [ $# -gt 0 ]; do
  case $1 in
    --no-build) build=0 ;;
    --kills) kills=${2:?--kills N}; shift ;;
    -h | --help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "restart.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

# shellcheck source=tests/e2e/lib.sh
source "$here/lib.sh"

e2e_checks_begin restart

[ "$build" = 0 ] || e2e_build
command -v ctr-remote >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stargz-snapshotter >/dev/null
}

E2E_EXIT_HOOK=summary
E2E_SHOAL_CONFIG_TEXT='version = 1
[remote]
background_fetch = false
# These checks count what reads fetched: no whole-blob identity pass.
verify_layers = false'
e2e_world_start
shoal_bin=$E2E_SHOAL_BIN
ctr_remote() { timeout 300 ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" "$@"; }
root="$E2E_DIR/shoal"

# start_shoal BIN: start the daemon on the same root and socket; wait until
# containerd reaches it. Sets $took to the seconds that took. (Not in a
# subshell: e2e_start records the pid for cleanup.)
start_shoal() {
  local t0 i
  t0=$(date +%s.%N)
  rm -f "$E2E_DIR/shoal.sock" # the dead daemon's; readiness is its reappearance
  log_mark=$(wc -l <"$E2E_DIR/logs/shoal.log")
  e2e_start shoal "$1" --root "$root" --address "$E2E_DIR/shoal.sock" \
    --config "$E2E_DIR/shoal-config.toml" --log-level info
  e2e_wait_for shoal "its socket" e2e_sock_ready "$E2E_DIR/shoal.sock"
  for i in $(seq 1 100); do
    E2E_CTR_TIMEOUT=10 e2e_ctr snapshots --snapshotter shoal ls >/dev/null 2>&1 && break
    sleep 0.1
  done
  took=$(printf '%.2f' "$(echo "$(date +%s.%N) - $t0" | bc)")
}
kill9_shoal() {
  local pid
  pid=$(e2e_pid_of shoal) || return 0
  kill -KILL "$pid"
  e2e_stop_pid shoal # reaps it and forgets the pid
}
# Mount ids of Shoal's FUSE layers under the root: unchanged ids mean the
# same mounts (resumed), new ids mean mounted again.
layer_mounts() { awk -v r="$root/" '$5 ~ "^" r && $0 ~ / - fuse[^ ]* shoal:/ { print $1 }' /proc/self/mountinfo | sort -n | tr '\n' ' '; }
# how_mounted: "R resumed, M mounted" by the daemon started last (its log).
how_mounted() {
  local new
  new=$(tail -n +"$((log_mark + 1))" "$E2E_DIR/logs/shoal.log")
  echo "$(grep -c 'resumed=true' <<<"$new") resumed, $(grep -c 'resumed=false' <<<"$new") mounted"
}
progress() { cat "$out/progress" 2>/dev/null || echo 0; }
# wait_progress N: true once the loop has done N more reads (20 s at most).
wait_progress() {
  local start i
  start=$(progress)
  for i in $(seq 1 200); do
    [ "$(progress)" -ge $((start + $1)) ] && return 0
    sleep 0.1
  done
  return 1
}

# --- the image ----------------------------------------------------------------
images="$E2E_DIR/images"
"$here/images.sh" "$images" "$E2E_REGISTRY" busybox >/dev/null 2>&1 || { fail "images: build"; exit 1; }
b="$E2E_DIR/rs-bundle"
umoci unpack --image "$images/oci:busybox-1" "$b" >/dev/null
mkdir -p "$b/rootfs/data/a" "$b/rootfs/data/b" "$b/rootfs/out"
for i in $(seq -w 0 299); do head -c 16384 /dev/urandom >"$b/rootfs/data/a/f$i"; done
umoci repack --refresh-bundle --image "$images/oci:rs" "$b" >/dev/null
for g in 0 1 2 3; do head -c $((8 << 20)) /dev/urandom >"$b/rootfs/data/b/g$g"; done
# SUMS: "HASH f PATH" (a whole file) or "HASH s PATH SLICE" (64 KiB slice),
# interleaved so that both data layers are read all the time.
(
  cd "$b/rootfs/data"
  for j in $(seq 0 511); do
    if [ "$j" -lt 300 ]; then
      f=a/f$(printf '%03d' "$j")
      echo "$(sha256sum <"$f" | cut -d' ' -f1) f $f"
    fi
    g=b/g$((j % 4)) s=$((j / 4))
    echo "$(dd if="$g" bs=65536 skip="$s" count=1 status=none | sha256sum | cut -d' ' -f1) s $g $s"
  done
) >"$b/rootfs/data/SUMS"
cat >"$b/rootfs/loop.sh" <<'SH'
#!/bin/sh
# Reads every entry of /data/SUMS forever, checksumming each read. Errors go
# to /out/errors, the number of reads to /out/progress.
cd /data || exit 1
n=0
while :; do
  while read -r want kind f s; do
    if [ "$kind" = f ]; then
      cat "$f" >/tmp/read 2>>/out/errors || echo "IOERR $f" >>/out/errors
    else
      dd if="$f" of=/tmp/read bs=65536 skip="$s" count=1 2>/tmp/dd.err || {
        cat /tmp/dd.err >>/out/errors; echo "IOERR $f $s" >>/out/errors; }
    fi
    got=$(sha256sum </tmp/read) || echo "IOERR sha256sum" >>/out/errors
    [ "${got%% *}" = "$want" ] || echo "BAD $f $s" >>/out/errors
    n=$((n + 1))
    echo "$n" >/out/progress
    usleep 50000
  done </data/SUMS
done
SH
chmod 755 "$b/rootfs/loop.sh"
umoci repack --refresh-bundle --image "$images/oci:rs" "$b" >/dev/null
skopeo copy -q oci:"$images/oci:rs" "docker://$E2E_REGISTRY/rs:1" --dest-tls-verify=false
src="$E2E_REGISTRY/rs:1" ref="$E2E_REGISTRY/rs:1-esgz"
if e2e_ctr image pull -q --plain-http "$src" >/dev/null &&
  ctr_remote image convert --estargz --oci "$src" "$ref" >/dev/null 2>&1 &&
  e2e_ctr image push --plain-http "$ref" >/dev/null 2>&1; then
  :
else
  fail "image: build, convert to eStargz, push"; exit 1
fi
# Nothing local: what the container reads comes through Shoal.
e2e_ctr image ls -q | xargs -r "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" image rm >/dev/null
e2e_ctr content ls -q | xargs -r "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" content rm >/dev/null 2>&1 || true
if ! o=$(ctr_remote image rpull --plain-http --snapshotter shoal "$ref" 2>&1); then
  fail "rpull $ref" "$(tail -n 5 <<<"$o")"; exit 1
fi
mounts0=$(layer_mounts)
if [ "$(wc -w <<<"$mounts0")" -eq 3 ]; then
  pass "image: 3 layers (busybox, 300 x 16 KiB, 4 x 8 MiB) mounted lazily"
else
  fail "image: 3 lazy layers" "FUSE mounts under the root: ${mounts0:-none}"; exit 1
fi

# --- the reading container ------------------------------------------------------
out="$E2E_DIR/out"
mkdir -p "$out"
: >"$out/errors"
e2e_ctr run -d --snapshotter shoal --mount "type=bind,src=$out,dst=/out,options=rbind:rw" \
  "$ref" restart-loop /bin/sh /loop.sh >/dev/null
if wait_progress 10; then
  pass "loop: container reads and checksums ($(progress) reads so far)"
else
  fail "loop: container reads" "$(cat "$out/errors")"; exit 1
fi
task_running() { e2e_ctr task ls 2>/dev/null | awk '$1 == "restart-loop" { print $3 }' | grep -qx RUNNING; }

# --- kill -9 -------------------------------------------------------------------
bad=() times=()
for k in $(seq 1 "$kills"); do
  sleep 1
  kill9_shoal
  sleep 1 # the gap: the loop's reads wait in the kernel
  start_shoal "$shoal_bin"
  times+=("$took")
  m=$(layer_mounts) h=$(how_mounted)
  if [ "$m" != "$mounts0" ] || [ "$h" != "3 resumed, 0 mounted" ]; then
    bad+=("kill $k: mounts '$mounts0' -> '$m'; $h")
  elif ! wait_progress 5; then
    bad+=("kill $k: the loop did not go on")
  fi
done
if [ ${#bad[@]} -eq 0 ]; then
  pass "kill -9: $kills restarts, mounts resumed each time, loop went on (serving again after ${times[*]} s)"
else
  fail "kill -9 restarts" "$(printf '%s\n' "${bad[@]}")"
fi

# --- a read in flight at the kill ---------------------------------------------------
# Pause the registry so the loop's next uncached read stays in the daemon's
# hands (read from /dev/fuse, fetch under way), kill -9 the daemon, start a
# new one, resume the registry. Only FUSE_NOTIFY_RESEND gets that request to
# the new daemon; without it the read would hang for good.
reg=$(e2e_pid_of registry)
kill -STOP "$reg"
last=$(progress) still=0
for i in $(seq 1 100); do
  sleep 0.2
  p=$(progress)
  if [ "$p" = "$last" ]; then still=$((still + 1)); else still=0 last=$p; fi
  [ "$still" -ge 8 ] && break
done
kill9_shoal
start_shoal "$shoal_bin"
kill -CONT "$reg"
if [ "$still" -ge 8 ] && wait_progress 5 && [ "$(how_mounted)" = "3 resumed, 0 mounted" ]; then
  pass "in flight: a read stuck at read $last (registry paused) when the daemon was killed was answered by the next one"
else
  fail "in flight: read resent after kill -9" "stalled=$still reads=$(progress) $(how_mounted)"
fi

# --- SIGTERM -------------------------------------------------------------------
bad=()
for k in 1 2 3; do
  e2e_stop_pid shoal
  m=$(layer_mounts)
  [ "$m" = "$mounts0" ] || bad+=("stop $k: mounts changed while stopped: '$m'")
  sleep 0.5
  start_shoal "$shoal_bin"
  m=$(layer_mounts) h=$(how_mounted)
  if [ "$m" != "$mounts0" ] || [ "$h" != "3 resumed, 0 mounted" ]; then
    bad+=("restart $k: mounts '$m'; $h")
  elif ! wait_progress 5; then
    bad+=("restart $k: the loop did not go on")
  fi
done
if [ ${#bad[@]} -eq 0 ]; then
  pass "SIGTERM: 3 graceful restarts left the mounts in place and resumed them"
else
  fail "SIGTERM restarts" "$(printf '%s\n' "${bad[@]}")"
fi

# --- upgrade and back ------------------------------------------------------------
other="$E2E_DIR/upgrade/shoal-snapshotter"
mkdir -p "${other%/*}"
cp "$shoal_bin" "$other"
bad=()
for bin in "$other" "$shoal_bin"; do
  e2e_stop_pid shoal
  start_shoal "$bin"
  exe=$(readlink "/proc/$(e2e_pid_of shoal)/exe")
  [ "$exe" = "$(readlink -f "$bin")" ] || bad+=("running $exe, not $bin")
  [ "$(layer_mounts)" = "$mounts0" ] && [ "$(how_mounted)" = "3 resumed, 0 mounted" ] ||
    bad+=("$bin: mounts '$(layer_mounts)'; $(how_mounted)")
  wait_progress 5 || bad+=("$bin: the loop did not go on")
done
if [ ${#bad[@]} -eq 0 ]; then
  pass "upgrade: to $other and back, mounts resumed, loop went on"
else
  fail "upgrade" "$(printf '%s\n' "${bad[@]}")"
fi

# --- what the loop saw ---------------------------------------------------------------
reads=$(progress)
if [ ! -s "$out/errors" ] && task_running && [ "$reads" -gt 50 ]; then
  pass "loop: $reads reads, 0 I/O errors, 0 wrong checksums, task still running"
else
  fail "loop: errors or stopped" "$(head -n 20 "$out/errors"; e2e_ctr task ls)"
fi
grep -q 'resumed=true' "$E2E_DIR/logs/shoal.log" && ! grep -q 'FUSE_NOTIFY_RESEND failed' "$E2E_DIR/logs/shoal.log" ||
  fail "daemon log: resumed layers with FUSE_NOTIFY_RESEND" "$(grep -E 'resume|RESEND' "$E2E_DIR/logs/shoal.log" | tail -5)"
E2E_CTR_TIMEOUT=20 e2e_ctr task kill -s SIGKILL restart-loop >/dev/null 2>&1 || true
for i in $(seq 1 50); do task_running || break; sleep 0.1; done
e2e_ctr task rm -f restart-loop >/dev/null 2>&1 || true
e2e_ctr container rm restart-loop >/dev/null 2>&1 || true

# --- boot with the registry down ---------------------------------------------------------
e2e_stop_pid registry
kill9_shoal
start_shoal "$shoal_bin"
secs=$took
chain=$(e2e_ctr snapshots --snapshotter shoal ls | awk 'NR > 1 && $3 == "Committed" { print $1; exit }')
want=$(awk '$3 == "a/f000" { print $1 }' "$b/rootfs/data/SUMS")
if [ -n "$chain" ] && e2e_ctr snapshots --snapshotter shoal info "$chain" >/dev/null &&
  o=$(E2E_CTR_TIMEOUT=60 e2e_ctr run --rm --snapshotter shoal "$ref" restart-offline sha256sum /data/a/f000 2>&1) &&
  [ "${o%% *}" = "$want" ]; then
  pass "registry down: daemon serving after ${secs} s, Stat/List answer, a container read cached data"
else
  fail "registry down" "chain=$chain out=${o:-}"
fi
e2e_start registry docker-registry serve "$E2E_DIR/registry/config.yml"
e2e_wait_for registry "port ${E2E_REGISTRY#*:}" e2e_http_ok "${E2E_REGISTRY#*:}" /v2/

# --- kept fds whose mounts are gone --------------------------------------------------
# The holder still keeps the 3 fds, but someone unmounted the layers while
# the daemon was down: the daemon must drop those fds and mount afresh.
kill9_shoal
holder_pid=$(cat "$root/fdholder.pid")
# Lazily and by name only (-c): a plain umount would stat the mount point
# and wait for the FUSE server that is not running.
for mp in $(e2e_mounts_under "$root"); do umount -l -c "$mp"; done
start_shoal "$shoal_bin"
m=$(layer_mounts) h=$(how_mounted)
# The holder now keeps the 3 new connections, not the 3 dead ones as well.
held=$(find "/proc/$holder_pid/fd" -lname /dev/fuse 2>/dev/null | wc -l)
if [ "$(wc -w <<<"$m")" -eq 3 ] && [ "$h" = "0 resumed, 3 mounted" ] && [ "$held" -eq 3 ]; then
  pass "stale fds: mounts gone while down; the kept fds were dropped and 3 layers mounted afresh (holder keeps 3 fds)"
else
  fail "stale fds" "mounts='$m' $h; holder $holder_pid keeps $held /dev/fuse fds"
fi

# --- kept TOCs that do not verify, registry down --------------------------------
# The daemon cannot resume a mount without its TOC: it must drop the kept
# connection (so that readers of the old mount get an error, never hang),
# remove the bad copies, start serving without the network, and mount the
# layers again once the registry is back.
mps=$(awk -v r="$root/" '$5 ~ "^" r && $0 ~ / - fuse[^ ]* shoal:/ { print $5 }' /proc/self/mountinfo)
rm -f "$out/go" "$out"/reader-*
readers=() n=0
for mp in $mps; do
  n=$((n + 1))
  # cwd on the mount before the restart: the old connection, as a running
  # container's overlay holds it.
  (cd "$mp" && while [ ! -e "$out/go" ]; do sleep 0.1; done &&
    t0=$(date +%s) && rc=0 &&
    { timeout 20 sh -c 'ls -a . >/dev/null && find . -type f | head -n 20 | xargs cat >/dev/null' 2>/dev/null || rc=$?; } &&
    echo "$rc $(($(date +%s) - t0))" >"$out/reader-$n") &
  readers+=($!)
done
kill9_shoal
for f in "$root"/tocs/*.toc; do printf 'not the TOC' | dd of="$f" bs=1 seek=64 conv=notrunc status=none; done
e2e_stop_pid registry
start_shoal "$shoal_bin"
secs=$took
touch "$out/go"
for p in "${readers[@]}"; do wait "$p" || true; done
results=$(cat "$out"/reader-* 2>/dev/null | tr '\n' ',')
bad_left=$(find "$root/tocs" -name '*.toc' | wc -l)
ok=1
for r in $(cat "$out"/reader-* 2>/dev/null | awk '{ print $1 }'); do
  [ "$r" -ne 0 ] && [ "$r" -ne 124 ] || ok=0
done
if [ "$n" -eq 3 ] && [ "$(ls "$out"/reader-* | wc -l)" -eq 3 ] && [ "$ok" -eq 1 ] && [ "$bad_left" -eq 0 ]; then
  pass "bad kept TOCs, registry down: daemon serving after ${secs} s, readers of the 3 old mounts got errors (rc,s: $results), bad copies removed"
else
  fail "bad kept TOCs, registry down" "readers=$n results='$results' (124: hung) tocs left=$bad_left"
fi
e2e_start registry docker-registry serve "$E2E_DIR/registry/config.yml"
e2e_wait_for registry "port ${E2E_REGISTRY#*:}" e2e_http_ok "${E2E_REGISTRY#*:}" /v2/
back() { [ "$(tail -n +"$((log_mark + 1))" "$E2E_DIR/logs/shoal.log" | grep -c 'remote layer mounted again')" -eq 3 ]; }
for i in $(seq 1 90); do back && break; sleep 1; done
m=$(layer_mounts) tocs=$(find "$root/tocs" -name '*.footer.json' | wc -l)
if back && [ "$(wc -w <<<"$m")" -eq 3 ] && [ "$tocs" -eq 3 ]; then
  pass "bad kept TOCs: registry back, the 3 layers mounted again in the background and their TOCs kept again"
else
  fail "bad kept TOCs: remount in the background" "mounts='$m' tocs=$tocs $(grep -E 'TOC|mounted again' "$E2E_DIR/logs/shoal.log" | tail -5)"
fi

# --- reboot simulation -----------------------------------------------------------------
snaps_before=$(e2e_ctr snapshots --snapshotter shoal ls | sort)
kill9_shoal
e2e_stop_fdholder
e2e_unmount_all_under "$root"
[ -z "$(layer_mounts)" ] || fail "reboot: unmount everything" "$(layer_mounts)"
start_shoal "$shoal_bin"
m=$(layer_mounts) h=$(how_mounted)
snaps_after=$(e2e_ctr snapshots --snapshotter shoal ls | sort)
check='cd /data && while read -r want kind f s; do
  if [ "$kind" = f ]; then got=$(sha256sum <"$f"); else got=$(dd if="$f" bs=65536 skip="$s" count=1 2>/dev/null | sha256sum); fi
  [ "${got%% *}" = "$want" ] || echo "BAD $f $s"; done <SUMS; echo done'
o=
why=
# (Mount ids can be reused once unmounted; the log says what happened.)
if [ "$(wc -w <<<"$m")" -ne 3 ] || [ "$h" != "0 resumed, 3 mounted" ]; then
  why="FUSE mounts after the restart: '$m'; $h"
elif [ "$snaps_before" != "$snaps_after" ]; then
  why="snapshots differ: $(diff <(echo "$snaps_before") <(echo "$snaps_after") || true)"
elif ! o=$(E2E_CTR_TIMEOUT=120 e2e_ctr run --rm --snapshotter shoal "$ref" restart-reboot sh -c "$check" 2>&1) ||
  [ "$o" != done ]; then
  why="container: $(head -n 5 <<<"$o")"
fi
if [ -z "$why" ]; then
  pass "reboot: layers mounted afresh (3 new mounts), snapshots unchanged, a container read all $(wc -l <"$b/rootfs/data/SUMS") entries correctly"
else
  fail "reboot simulation" "$why"
fi

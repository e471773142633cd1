#!/usr/bin/env bash
# End-to-end fault tests: Shoal reads lazily pulled eStargz layers through a
# test-only HTTP proxy (tests/e2e/faultproxy.py) in front of the registry,
# which flips bytes, truncates bodies, stalls or drops connections on demand.
# containerd talks to the registry directly, so only Shoal sees the faults.
# Needs root. Prints PASS/FAIL lines and ends with `faults: N passed, M failed`.
#
#   tests/e2e/faults.sh [--no-build]
#
# Shoal runs with request_timeout_secs = 2, retries = 2, background fetch off
# (only reads fetch), and a hosts.toml that sends it to the proxy. Every case
# uses its own image (busybox + fresh random 4 MiB files, so no chunk is
# cached from an earlier case); a container sha256sums a file. Cases:
#   1 flip once      one corrupted response: correct sha256, verify_failures up
#   2 flip always    every response corrupted: the read fails (EIO), never a
#                    wrong sha256; after the proxy heals, correct again
#   3 truncate once  body cut short: retried, correct sha256
#   4 stall once     no answer for longer than the request timeout: retried,
#                    correct sha256 in bounded time
#   5 registry gone  after the mount: cached file still reads, uncached file
#                    fails with EIO (refused connections, then a black hole)
#                    within a bound, and reads again once the registry is back
#   6 bad TOC        the TOC response is corrupted during rpull (6a), or the
#                    manifest's TOC digest is wrong (6b): Shoal falls back,
#                    containerd pulls the layer itself, the container is right
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/e2e/lib.sh
source "$here/lib.sh"
e2e_simple_args "$@"

e2e_checks_begin faults
info() { printf "      %s\n" "$@"; }

[ "$build" = 0 ] || e2e_build
command -v ctr-remote >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stargz-snapshotter >/dev/null
}
command -v python3 >/dev/null || e2e_die "python3 is needed for the fault proxy"

E2E_EXIT_HOOK=summary
e2e_world_start
cli="$repo/target/release/shoal"
ctr_remote() { timeout 300 ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" "$@"; }
status_json() { "$cli" status --address "$E2E_DIR/shoal.sock" --json; }
counter() { status_json | jq -r ".counters.$1 // 0"; }
shoal_log() { sed 's/\x1b\[[0-9;]*m//g' "$E2E_DIR/logs/shoal.log"; }
log_mark() { shoal_log | wc -l; }
log_since() { shoal_log | tail -n +$(($1 + 1)); }
now() { date +%s.%N; }
since() { printf '%.1f' "$(echo "$(now) - $1" | bc)"; }

# --- the proxy --------------------------------------------------------------
start_proxy() {
  local tries
  for tries in 1 2 3; do
    proxy_port=$(e2e_free_port) || e2e_die "no free TCP port"
    e2e_start faultproxy python3 -u "$here/faultproxy.py" \
      --listen "127.0.0.1:$proxy_port" --upstream "$E2E_REGISTRY"
    local deadline=$((SECONDS + E2E_TIMEOUT)) pid
    pid=$(e2e_pid_of faultproxy)
    until e2e_http_ok "$proxy_port" /__stats; do
      kill -0 "$pid" 2>/dev/null || break
      [ "$SECONDS" -lt "$deadline" ] || break
      sleep 0.1
    done
    e2e_http_ok "$proxy_port" /__stats && return 0
    e2e_stop_pid faultproxy
  done
  e2e_tail_log faultproxy
  e2e_die "fault proxy did not come up"
}
start_proxy
# fault QUERY: set the proxy's fault (see faultproxy.py), e.g. mode=flip&count=1.
fault() { curl -sf -X POST "http://127.0.0.1:$proxy_port/__fault?$1" >/dev/null || e2e_die "cannot set fault $1"; }
proxy_stats() { curl -sf "http://127.0.0.1:$proxy_port/__stats"; }
proxy_count() { proxy_stats | jq -r ".by_action.$1"; }

# --- Shoal through the proxy --------------------------------------------------
# containerd's host directory naming; Shoal also accepts HOST_PORT_.
certs="$E2E_DIR/certs.d"
mkdir -p "$certs/$E2E_REGISTRY"
cat >"$certs/$E2E_REGISTRY/hosts.toml" <<TOML
server = "http://127.0.0.1:$proxy_port"

[host."http://127.0.0.1:$proxy_port"]
  capabilities = ["pull", "resolve"]
TOML
config="$E2E_DIR/shoal-config.toml"
cat >"$config" <<TOML
version = 1
[registry]
config_path = "$certs"
request_timeout_secs = 2
retries = 2
[remote]
background_fetch = false
# These checks count what reads fetched: no whole-blob identity pass.
verify_layers = false
TOML
restart_shoal() {
  e2e_stop_pid shoal
  rm -f "$E2E_DIR/shoal.sock"
  e2e_start shoal "$E2E_SHOAL_BIN" --root "$E2E_DIR/shoal" --address "$E2E_DIR/shoal.sock" \
    --config "$config" --log-level "info,shoal=debug"
  e2e_wait_for shoal "its socket" e2e_sock_ready "$E2E_DIR/shoal.sock"
  local i
  for i in $(seq 1 50); do
    e2e_ctr snapshots --snapshotter shoal ls >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  e2e_die "containerd does not reach the restarted shoal-snapshotter"
}
restart_shoal

# --- images -------------------------------------------------------------------
images="$E2E_DIR/images"
sums="$E2E_DIR/sums"
mkdir -p "$sums"
"$here/images.sh" "$images" "$E2E_REGISTRY" busybox >/dev/null 2>&1 || { fail "images: build busybox:1"; exit 1; }

# make_image CASE FILE...: busybox:1 plus a layer with /data/FILE (4 MiB of
# fresh random bytes each), pushed as faults:CASE and converted to eStargz
# as faults:CASE-esgz. Records each file's sha256 in $sums/CASE-FILE.
make_image() {
  local name=$1 b="$E2E_DIR/bundle-$1" f src
  shift
  umoci unpack --image "$images/oci:busybox-1" "$b" >/dev/null
  mkdir -p "$b/rootfs/data"
  for f in "$@"; do
    head -c $((4 << 20)) /dev/urandom >"$b/rootfs/data/$f"
    sha256sum "$b/rootfs/data/$f" | cut -d' ' -f1 >"$sums/$name-$f"
  done
  umoci repack --refresh-bundle --image "$images/oci:faults-$name" "$b" >/dev/null
  rm -rf "$b"
  src="$E2E_REGISTRY/faults:$name"
  skopeo copy -q "oci:$images/oci:faults-$name" "docker://$src" --dest-tls-verify=false
  e2e_ctr image pull -q --plain-http "$src" >/dev/null
  ctr_remote image convert --estargz --oci "$src" "$src-esgz" >/dev/null
  e2e_ctr image push --plain-http "$src-esgz" >/dev/null 2>&1
}
t0=$(now)
for spec in "c1 f.bin" "c2 f.bin" "c3 f.bin" "c4 f.bin" "c5 a.bin b.bin c.bin" "c6a f.bin" "c6b f.bin"; do
  # shellcheck disable=SC2086
  make_image $spec || { fail "images: build and convert ${spec%% *}"; exit 1; }
done
# Start from an empty content store, so a layer blob there was pulled by
# containerd itself.
e2e_ctr image ls -q | xargs -r -n 20 "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" image rm >/dev/null
e2e_ctr content ls -q | xargs -r -n 20 "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" content rm >/dev/null 2>&1 || true
pass "images: 7 busybox+random-data images built, converted to eStargz, pushed ($(since "$t0")s)"

manifest() { # REF -> the manifest JSON, from the registry
  local ref=$1 r tag
  r=${ref#*/}; tag=${r##*:}; r=${r%:*}
  curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$E2E_REGISTRY/v2/$r/manifests/$tag"
}
data_layer() { manifest "$1" | jq -r '.layers[-1].digest'; }
lazily_mounted() { grep -qF "shoal:$1 " /proc/mounts; }

rpull() { ctr_remote image rpull --plain-http --snapshotter shoal "$1" >"$E2E_DIR/rpull.out" 2>&1; }

# read_file REF FILE: sha256sum /data/FILE in a new container, bounded by
# 60 s. Sets out, rc, secs.
run_id=0
read_file() {
  local ref=$1 file=$2 t
  run_id=$((run_id + 1))
  t=$(now)
  rc=0
  out=$(E2E_CTR_TIMEOUT=60 e2e_ctr run --rm --snapshotter shoal "$ref" "faults-$run_id" \
    sh -c "sha256sum /data/$file" 2>&1) || rc=$?
  secs=$(since "$t")
}
# The sha256 FILE of CASE must have.
want() { cat "$sums/$1-$2"; }
# correct CASE FILE: the last read printed the right sha256 and exited 0.
correct() { [ "$rc" = 0 ] && [ "$(awk '{ print $1; exit }' <<<"$out")" = "$(want "$1" "$2")" ]; }
# wrong_hash CASE FILE: the last read printed some other sha256.
wrong_hash() {
  local h
  for h in $(grep -oE '\b[0-9a-f]{64}\b' <<<"$out" || true); do
    [ "$h" = "$(want "$1" "$2")" ] || return 0
  done
  return 1
}
# read_failed CASE FILE: the read failed (non-zero, not killed by the bound)
# without printing any sha256.
read_failed() {
  [ "$rc" != 0 ] && [ "$rc" != 124 ] && ! grep -qE '\b[0-9a-f]{64}\b' <<<"$out"
}

# prepare CASE: rpull faults:CASE-esgz (proxy healthy); sets ref and layer.
# Fails the case unless the data layer is mounted lazily.
prepare() {
  ref="$E2E_REGISTRY/faults:$1-esgz"
  layer=$(data_layer "$ref")
  fault "mode=ok"
  if ! rpull "$ref"; then
    fail "$1: rpull" "$(tail -n 5 "$E2E_DIR/rpull.out")"
    return 1
  fi
  if ! lazily_mounted "$layer"; then
    fail "$1: data layer $layer mounted lazily (precondition)" "$(grep shoal: /proc/mounts || true)"
    return 1
  fi
}

# --- 1: flip once -----------------------------------------------------------------
if prepare c1; then
  gets0=$(proxy_stats | jq .blob_gets)
  vf0=$(counter verify_failures)
  fault "mode=flip&count=1&digest=$layer"
  read_file "$ref" f.bin
  vf=$(($(counter verify_failures) - vf0))
  flips=$(proxy_count flip)
  if [ "$(proxy_stats | jq .blob_gets)" -gt "$gets0" ]; then
    pass "setup: Shoal fetches layer blobs through the fault proxy (hosts.toml)"
  else
    fail "setup: Shoal fetches through the proxy" "the proxy saw no blob GET"
  fi
  if correct c1 f.bin && [ "$vf" -ge 1 ] && [ "$flips" -ge 1 ]; then
    pass "1 flip once: correct sha256 after the corrupted chunk was dropped and refetched (verify_failures +$vf, ${secs}s)"
  else
    fail "1 flip once: correct sha256 and verify_failures >= 1" \
      "rc=$rc verify_failures +$vf flips=$flips output: $out"
  fi
fi

# --- 2: flip always -----------------------------------------------------------------
if prepare c2; then
  vf0=$(counter verify_failures)
  mark=$(log_mark)
  fault "mode=flip&digest=$layer"
  read_file "$ref" f.bin
  vf=$(($(counter verify_failures) - vf0))
  eio=$(log_since "$mark" | grep -c 'read failed: EIO' || true)
  if wrong_hash c2 f.bin; then
    fail "2 flip always: never a wrong sha256" "rc=$rc output: $out"
  elif read_failed c2 f.bin && [ "$vf" -ge 2 ] && [ "$eio" -ge 1 ]; then
    pass "2 flip always: read fails, no sha256 printed (rc=$rc: $(tail -n 1 <<<"$out"); verify_failures +$vf, $eio EIO log lines, ${secs}s)"
  else
    fail "2 flip always: the read fails with EIO" \
      "rc=$rc verify_failures +$vf EIO log lines=$eio (${secs}s) output: $out"
  fi
  fault "mode=ok"
  read_file "$ref" f.bin
  if correct c2 f.bin; then
    pass "2 flip always, then healed: correct sha256 (${secs}s)"
  else
    fail "2 flip always, then healed: correct sha256" "rc=$rc output: $out"
  fi
fi

# --- 3: truncate once -----------------------------------------------------------------
if prepare c3; then
  se0=$(counter source_errors)
  mark=$(log_mark)
  fault "mode=truncate&count=1&digest=$layer"
  read_file "$ref" f.bin
  se=$(($(counter source_errors) - se0))
  retried=$(log_since "$mark" | grep -E 'registry host failed|retrying registry request|range fetch failed' | head -n 1 || true)
  if correct c3 f.bin && [ "$(proxy_count truncate)" -ge 1 ] && { [ "$se" -ge 1 ] || [ -n "$retried" ]; }; then
    pass "3 truncate once: correct sha256 after a retry (${secs}s; source_errors +$se)"
    info "log: $(cut -c1-300 <<<"$retried")"
  else
    fail "3 truncate once: correct sha256, retry visible" \
      "rc=$rc truncations=$(proxy_count truncate) source_errors +$se retry log: ${retried:-none} output: $out"
  fi
fi

# --- 4: stall once -----------------------------------------------------------------
if prepare c4; then
  mark=$(log_mark)
  fault "mode=stall&count=1&stall=8&digest=$layer"
  read_file "$ref" f.bin
  timed_out=$(log_since "$mark" | grep -E 'registry host failed|retrying registry request' | grep -i 'timed out\|timeout' | head -n 1 || true)
  if correct c4 f.bin && [ "$(proxy_count stall)" -ge 1 ] && [ -n "$timed_out" ] &&
    [ "$(echo "$secs < 30" | bc)" = 1 ]; then
    pass "4 stall once (8s stall, 2s request timeout): correct sha256 in ${secs}s (bound 30s)"
    info "log: $(cut -c1-300 <<<"$timed_out")"
  else
    fail "4 stall once: correct sha256 after timeout and retry, within 30s" \
      "rc=$rc ${secs}s stalls=$(proxy_count stall) timeout log: ${timed_out:-none} output: $out"
  fi
fi

# --- 5: registry goes away after the mount ------------------------------------------------
if prepare c5; then
  read_file "$ref" a.bin
  if correct c5 a.bin; then
    pass "5 registry up: a.bin correct (${secs}s)"
  else
    fail "5 registry up: a.bin correct" "rc=$rc output: $out"
  fi
  fault "mode=down&all=1"
  fetched0=$(counter bytes_fetched)
  read_file "$ref" a.bin
  if correct c5 a.bin && [ "$(counter bytes_fetched)" = "$fetched0" ]; then
    pass "5 registry down (connections dropped): cached a.bin still correct (${secs}s)"
  else
    fail "5 registry down: cached a.bin still correct" "rc=$rc output: $out"
  fi
  mark=$(log_mark)
  read_file "$ref" b.bin
  eio=$(log_since "$mark" | grep 'read failed: EIO' | head -n 1 || true)
  if wrong_hash c5 b.bin; then
    fail "5 registry down: uncached b.bin never a wrong sha256" "rc=$rc output: $out"
  elif read_failed c5 b.bin && [ -n "$eio" ]; then
    pass "5 registry down: uncached b.bin fails with EIO in ${secs}s, no hang (rc=$rc: $(tail -n 1 <<<"$out"))"
  else
    fail "5 registry down: uncached b.bin fails with EIO within 60s" \
      "rc=$rc (${secs}s; 124 = hung until the bound) EIO log: ${eio:-none} output: $out"
  fi
  # A black hole: connections accepted, nothing ever answered.
  fault "mode=stall&stall=30&all=1"
  mark=$(log_mark)
  read_file "$ref" c.bin
  eio=$(log_since "$mark" | grep 'read failed: EIO' | head -n 1 || true)
  if wrong_hash c5 c.bin; then
    fail "5 registry black hole: uncached c.bin never a wrong sha256" "rc=$rc output: $out"
  elif read_failed c5 c.bin && [ -n "$eio" ]; then
    pass "5 registry black hole: uncached c.bin fails with EIO after the timeouts, in ${secs}s (bound 60s)"
  else
    fail "5 registry black hole: uncached c.bin fails with EIO within 60s" \
      "rc=$rc (${secs}s; 124 = hung until the bound) EIO log: ${eio:-none} output: $out"
  fi
  fault "mode=ok"
  read_file "$ref" b.bin
  b_ok=no b_out="rc=$rc $out"
  correct c5 b.bin && b_ok=yes
  read_file "$ref" c.bin
  if [ "$b_ok" = yes ] && correct c5 c.bin; then
    pass "5 registry back: b.bin and c.bin correct"
  else
    fail "5 registry back: b.bin and c.bin correct" "b.bin: $b_out; c.bin: rc=$rc $out"
  fi
fi

# --- 6: TOC that does not verify -> fallback -----------------------------------------------
# check_fallback CASE TITLE REASON-PATTERN: after an rpull of $ref, the data
# layer fell back (counted, logged with a reason matching the pattern),
# containerd downloaded the blob, and the container reads the right bytes.
check_fallback() {
  local id=$1 c=$2 pattern=$3 fb reason downloaded=no
  fb=$(($(counter fallbacks) - fb0))
  reason=$(log_since "$mark" | grep 'falling back to a normal pull' | grep -F "$layer" | head -n 1 || true)
  grep -qx "$layer" <<<"$(e2e_ctr content ls -q)" && downloaded=yes
  if [ "$fb" -ge 1 ] && ! lazily_mounted "$layer" && [ "$downloaded" = yes ] &&
    grep -qE "$pattern" <<<"$reason"; then
    pass "$c: Shoal fell back (fallbacks +$fb); containerd downloaded the layer; not a FUSE mount"
    info "log: $(grep -oE 'reason=.*' <<<"$reason" | cut -c1-300)"
  else
    fail "$c: fallback counted and logged, layer pulled by containerd" \
      "fallbacks +$fb; FUSE-mounted: $(lazily_mounted "$layer" && echo yes || echo no); blob in content store: $downloaded; log: ${reason:-none}"
  fi
  read_file "$ref" f.bin
  if correct "$id" f.bin; then
    pass "$c: container after the fallback prints the correct sha256"
  else
    fail "$c: container after the fallback" "rc=$rc output: $out"
  fi
}

# 6a: corrupt the TOC response (the Range GET after the 51-byte footer).
ref="$E2E_REGISTRY/faults:c6a-esgz"
layer=$(data_layer "$ref")
fb0=$(counter fallbacks)
mark=$(log_mark)
fault "mode=flip&count=1&digest=$layer&min_len=52"
if rpull "$ref"; then
  if [ "$(proxy_count flip)" -ge 1 ] && [ "$(proxy_stats | jq -r .fault.mode)" = ok ]; then
    check_fallback c6a "6a TOC corrupted in transit" 'TOC|gzip|deflate|corrupt|invalid'
  else
    fail "6a TOC corrupted in transit: the proxy flipped the TOC response" "$(proxy_stats | jq -c '.fault, .recent[-4:]')"
  fi
else
  fail "6a TOC corrupted in transit: rpull still succeeds" "$(tail -n 5 "$E2E_DIR/rpull.out")"
fi
fault "mode=ok"

# 6b: the manifest vouches for another TOC digest than the layer's.
src="$E2E_REGISTRY/faults:c6b-esgz"
ref="$E2E_REGISTRY/faults:c6b-badtoc"
layer=$(data_layer "$src")
bad_toc="sha256:$(printf 'not the TOC' | sha256sum | cut -d' ' -f1)"
manifest "$src" |
  jq -c --arg d "$bad_toc" '.layers[-1].annotations["containerd.io/snapshot/stargz/toc.digest"] = $d' \
    >"$E2E_DIR/badtoc.json"
if curl -sf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
  --data-binary @"$E2E_DIR/badtoc.json" "http://$E2E_REGISTRY/v2/faults/manifests/c6b-badtoc" >/dev/null; then
  fb0=$(counter fallbacks)
  mark=$(log_mark)
  if rpull "$ref"; then
    check_fallback c6b "6b TOC digest mismatch (manifest annotation)" 'TOC digest mismatch'
  else
    fail "6b TOC digest mismatch: rpull still succeeds" "$(tail -n 5 "$E2E_DIR/rpull.out")"
  fi
else
  fail "6b: push a manifest with a wrong TOC digest"
fi

echo
info "proxy: $(proxy_stats | jq -c '{requests, blob_gets, by_action}')"
info "shoal: $(status_json | jq -c '.counters | {verify_failures, source_errors, fallbacks, requests, bytes_fetched}')"

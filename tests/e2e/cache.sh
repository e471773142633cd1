#!/usr/bin/env bash
# End-to-end test of Shoal's chunk cache with real parts: two tags of a
# Debian+python3 image (the second adds a package, rebuilt as one new layer),
# converted by ctr-remote to eStargz, pulled lazily through Shoal, read in
# full and compared with their source trees. Needs root.
# Prints PASS/FAIL lines and ends with `cache: N passed, M failed`.
#
#   tests/e2e/cache.sh [--no-build]
#
# Checks:
#   - dedup: after reading both images, the chunk store holds about their
#     union and the registry sent about their union, not their sum (bounds
#     asserted: <= 1.1x the larger image, uncompressed and compressed);
#   - `shoal gc --dry-run --json`, `shoal gc --json`, `shoal pin`/`unpin`,
#     `shoal status --json` (images, pinned, cache, last GC) and /metrics
#     against the real daemon;
#   - crash: kill -9 while the background fetch writes chunks and lays large
#     files out as whole-file objects, 5 times; no chunk on disk (in its own
#     file or in an object) has bytes other than its digest says, every chunk
#     acknowledged before a kill is still there, and both images read back
#     equal to their sources;
#   - passthrough: once laid out, a container reads the large files by
#     kernel passthrough (the mount's iomodes log), and they are equal to
#     the source;
#   - full disk: the chunk store on an 8 MiB tmpfs; a container still starts
#     and both images read correctly; the log and the metric show it.
#
# Builds images from /var/cache/shoal-bench/rootfs-bookworm-python3
# (tests/e2e/rootfs.sh makes it once with debootstrap) and downloads one
# package from the Debian mirror.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/e2e/lib.sh
source "$here/lib.sh"
e2e_simple_args "$@"

e2e_checks_begin cache
[ "$build" = 0 ] || e2e_build
ROOTFS=$("$here/rootfs.sh") || {
  fail "setup: the python3 root filesystem (tests/e2e/rootfs.sh)"
  summary 1
  exit 1
}
command -v ctr-remote >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stargz-snapshotter >/dev/null
}

E2E_EXIT_HOOK=summary
e2e_world_start
cli="$repo/target/release/shoal"
sock="$E2E_DIR/shoal.sock"
root="$E2E_DIR/shoal"
ctr_remote() { timeout 600 ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" "$@"; }
status_json() { "$cli" status --address "$sock" --json; }
metrics_port=$(e2e_free_port)
metrics() { curl -sf "http://127.0.0.1:$metrics_port/metrics"; }

# shoal_config BACKGROUND: (re)writes the daemon's config.
config="$E2E_DIR/shoal-config.toml"
shoal_config() {
  cat >"$config" <<TOML
version = 1
[remote]
background_fetch = $1
verify_layers = $1
background_delay_secs = 0
[cache]
gc_interval_secs = 3600
[metrics]
address = "127.0.0.1:$metrics_port"
TOML
}
start_shoal() {
  rm -f "$sock"
  e2e_start shoal "$E2E_SHOAL_BIN" --root "$root" --address "$sock" --config "$config" \
    --log-level info
  e2e_wait_for shoal "its socket" e2e_sock_ready "$sock"
  local i
  for i in $(seq 1 50); do
    e2e_ctr snapshots --snapshotter shoal ls >/dev/null 2>&1 && return 0
    sleep 0.2
  done
}
shoal_config false
e2e_stop_pid shoal
start_shoal

# --- images -----------------------------------------------------------------
oci="$E2E_DIR/oci"
mkdir -p "$E2E_DIR/deb"
(cd "$E2E_DIR/deb" && apt-get download -qq python3-yaml >/dev/null 2>&1) ||
  { fail "images: apt-get download python3-yaml"; exit 1; }
build_image() { # TAG [DEB]: one layer: the rootfs (+ the package)
  local tag=$1 deb=${2:-} bundle="$E2E_DIR/bundle-$1"
  umoci new --image "$oci:$tag"
  umoci config --image "$oci:$tag" \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env LANG=C.UTF-8 --config.cmd python3 --config.workingdir /
  umoci unpack --image "$oci:$tag" "$bundle" >/dev/null
  cp -a "$ROOTFS/." "$bundle/rootfs/"
  [ -z "$deb" ] || dpkg-deb -x "$deb" "$bundle/rootfs/"
  umoci repack --refresh-bundle --image "$oci:$tag" "$bundle" >/dev/null
}
t0=$SECONDS
umoci init --layout "$oci"
build_image 1
build_image 2 "$(ls "$E2E_DIR"/deb/*.deb)"
ref1="$E2E_REGISTRY/py:1" ref2="$E2E_REGISTRY/py:2"
for n in 1 2; do
  skopeo copy -q "oci:$oci:$n" "docker://$E2E_REGISTRY/py:$n" --dest-tls-verify=false
  e2e_ctr image pull -q --plain-http "$E2E_REGISTRY/py:$n" >/dev/null
  ctr_remote image convert --estargz --oci "$E2E_REGISTRY/py:$n" "$E2E_REGISTRY/py:$n-esgz" >/dev/null
  e2e_ctr image push --plain-http "$E2E_REGISTRY/py:$n-esgz" >/dev/null
done
e2e_ctr image ls -q | xargs -r -n 20 "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" image rm >/dev/null
e2e_ctr content ls -q | xargs -r -n 20 "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" content rm >/dev/null 2>&1 || true
pass "images: py:1 (debian+python3) and py:2 (+ python3-yaml, one new layer) built, converted to eStargz, pushed ($((SECONDS - t0))s)"

manifest() { # REF
  local r=${1#*/}
  curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$E2E_REGISTRY/v2/${r%:*}/manifests/${r##*:}"
}
layer1=$(manifest "$ref1-esgz" | jq -r '.layers[0].digest')
layer2=$(manifest "$ref2-esgz" | jq -r '.layers[0].digest')
L1=$(manifest "$ref1-esgz" | jq '.layers[0].size')
L2=$(manifest "$ref2-esgz" | jq '.layers[0].size')
[ "$layer1" != "$layer2" ] || fail "images: the two tags share their layer digest (dedup would be trivial)"

# sums DIR: sha256 of every regular file, reading all of it; eStargz's own
# entries (TOC, landmarks) left out.
sums() {
  (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum) |
    grep -v -E '  \./(stargz\.index\.json|\.(no\.)?prefetch\.landmark)$'
}
usize() { find "$1" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}'; }
src1="$E2E_DIR/bundle-1/rootfs" src2="$E2E_DIR/bundle-2/rootfs"
sums "$src1" >"$E2E_DIR/src1.sums"
sums "$src2" >"$E2E_DIR/src2.sums"
U1=$(usize "$src1") U2=$(usize "$src2")
mnt() { awk -v f="shoal:$1" '$1 == f {print $2; exit}' /proc/mounts; }
# check_read N: every file of image N read through its FUSE mount equals the source.
check_read() {
  local n=$1 layer m
  layer=$([ "$n" = 1 ] && echo "$layer1" || echo "$layer2")
  m=$(mnt "$layer")
  [ -n "$m" ] || { echo "layer $layer not mounted"; return 1; }
  sums "$m" >"$E2E_DIR/got$n.sums" 2>"$E2E_DIR/got$n.err" || true
  diff -q "$E2E_DIR/src$n.sums" "$E2E_DIR/got$n.sums" >/dev/null ||
    { diff "$E2E_DIR/src$n.sums" "$E2E_DIR/got$n.sums" | head -n 5; head -n 3 "$E2E_DIR/got$n.err"; return 1; }
}

# --- dedup ------------------------------------------------------------------
for n in 1 2; do
  out=$(ctr_remote image rpull --plain-http --snapshotter shoal "$E2E_REGISTRY/py:$n-esgz" 2>&1) ||
    fail "dedup: rpull py:$n-esgz" "$(tail -n 5 <<<"$out")"
  if d=$(check_read "$n"); then
    pass "dedup: py:$n read in full through FUSE equals its source ($(wc -l <"$E2E_DIR/src$n.sums") files)"
  else
    fail "dedup: py:$n read back" "$d"
  fi
done
js=$(status_json)
used=$(jq '.cache.used_bytes' <<<"$js")
fetched=$(jq '.counters.bytes_fetched' <<<"$js")
alloc=$(du -s --block-size=1 "$root/chunks" | cut -f1)
say_ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
if [ "$used" -le $((U2 * 11 / 10)) ]; then
  pass "dedup: chunk store $used bytes ($alloc allocated) for images of $U1 + $U2 bytes: $(say_ratio "$used" "$U2")x the larger, $(say_ratio "$used" $((U1 + U2)))x the sum (bound 1.1x the larger)"
else
  fail "dedup: chunk store size" "$used bytes > 1.1 x $U2 (sum $((U1 + U2)))"
fi
big=$((L1 > L2 ? L1 : L2))
if [ "$fetched" -le $((big * 11 / 10)) ]; then
  pass "dedup: registry sent $fetched bytes for layers of $L1 + $L2 bytes: $(say_ratio "$fetched" "$big")x the larger, $(say_ratio "$fetched" $((L1 + L2)))x the sum (bound 1.1x the larger)"
else
  fail "dedup: registry bytes" "$fetched > 1.1 x $big (sum $((L1 + L2)))"
fi

# --- CLI and metrics ----------------------------------------------------------
if g=$("$cli" gc --address "$sock" --dry-run --json) &&
  jq -e --argjson u "$used" '.dry_run == true and .used_before == $u and .evicted_chunks == 0' <<<"$g" >/dev/null; then
  pass "shoal gc --dry-run --json: nothing to free under the limits ($(jq -c '{used_before, freed_bytes}' <<<"$g"))"
else
  fail "shoal gc --dry-run --json" "${g:-no output}"
fi
if "$cli" pin --address "$sock" "$ref2-esgz" >/dev/null &&
  js=$(status_json) &&
  jq -e --arg r "$ref2-esgz" '(.images[] | select(.image_ref == $r) | .pinned) == true and
      ([.layers[] | select(.image_ref == $r) | .pinned] | all) and (.cache.pins | index($r)) != null' <<<"$js" >/dev/null; then
  pass "shoal pin IMAGE: status shows the image and its layer pinned"
else
  fail "shoal pin" "$(jq -c '{images, pins: .cache.pins}' <<<"${js:-{\}}")"
fi
if out=$("$cli" pin --address "$sock" 'Not A Ref!' 2>&1); then
  fail "shoal pin refuses a bad target" "$out"
else
  pass "shoal pin refuses a bad target: $(tail -n 1 <<<"$out")"
fi
if g=$("$cli" gc --address "$sock" --json) && jq -e '.dry_run == false' <<<"$g" >/dev/null &&
  tocs=$(status_json | jq '[.layers[].toc_digest] | unique | length') &&
  jq -e --argjson n "$tocs" '.tocs_removed == 0 and .tocs_kept >= $n and $n > 0' <<<"$g" >/dev/null &&
  status_json | jq -e '.cache.last_gc.trigger == "manual"' >/dev/null; then
  pass "shoal gc --json ran, kept the TOCs of the $tocs mounted layer(s) ($(jq -c '{tocs_kept, tocs_removed}' <<<"$g")); status shows it as the last GC"
else
  fail "shoal gc --json" "${g:-no output}"
fi
"$cli" unpin --address "$sock" "$ref2-esgz" >/dev/null || fail "shoal unpin"
"$cli" status --address "$sock" >"$E2E_DIR/status.txt" || fail "shoal status (text)"
m=$(metrics || true)
missing=()
for want in 'shoal_fuse_read_bytes_total{source="fetched"}' 'shoal_fetch_bytes_total{source="registry"}' 'shoal_fuse_read_bytes_total{source="cache"}' \
  'shoal_fetch_duration_seconds_bucket{' 'shoal_verify_failures_total{stage="fetch"}' \
  'shoal_fallbacks_total{reason="toc"}' 'shoal_gc_runs_total ' 'shoal_gc_evictions_total' \
  'shoal_gc_freed_bytes_total' 'shoal_cache_bytes ' 'shoal_fetches_in_flight'; do
  grep -qF "$want" <<<"$m" || missing+=("$want")
done
reg_bytes=$(awk '$1 == "shoal_fuse_read_bytes_total{source=\"fetched\"}" {print $2}' <<<"$m")
cache_bytes=$(awk '$1 == "shoal_cache_bytes" {print $2}' <<<"$m")
if [ ${#missing[@]} -eq 0 ] && [ "${reg_bytes:-0}" -gt 0 ] && [ "${cache_bytes:-0}" -eq "$used" ]; then
  pass "/metrics on 127.0.0.1:$metrics_port: all families present; FUSE bytes from registry $reg_bytes; cache bytes = status"
else
  fail "/metrics" "missing: ${missing[*]:-none}; registry bytes ${reg_bytes:-?}; cache bytes ${cache_bytes:-?} vs $used"
fi

# --- crash: kill -9 while writing chunks -------------------------------------
# chunks_py MODE: over every chunk on disk, in its own file (16-byte header,
# crc32 checked) or in a whole-file object (chunks/files/XX/KEY with
# KEY.map: digest, offset, length, crc32 per chunk). MODE check prints
# "chunks bad first-bad-names" after hashing each chunk against its digest;
# MODE list prints the digests, sorted.
chunks_py() {
  python3 - "$root/chunks" "$1" <<'PY'
import hashlib, os, struct, sys, zlib
root, mode = sys.argv[1], sys.argv[2]
found, bad = [], []
for d in os.listdir(root):
    if len(d) != 2:
        continue
    for name in os.listdir(os.path.join(root, d)):
        found.append(name)
        if mode != "check":
            continue
        b = open(os.path.join(root, d, name), "rb").read()
        if b[:4] == b"SHC1":
            crc, length = struct.unpack("<IQ", b[4:16])
            data = b[16:]
            ok = length == len(data) and zlib.crc32(data) == crc
        else:
            data, ok = b, True
        if not ok or hashlib.sha256(data).hexdigest() != name:
            bad.append(name)
files = os.path.join(root, "files")
for d in (os.listdir(files) if os.path.isdir(files) else []):
    for name in os.listdir(os.path.join(files, d)):
        if not name.endswith(".map"):
            continue
        m = open(os.path.join(files, d, name), "rb").read()
        obj = os.path.join(files, d, name[:-4])
        if not os.path.exists(obj):
            continue  # not visible: the daemon drops it at start
        data = open(obj, "rb").read() if mode == "check" else b""
        n = struct.unpack("<I", m[4:8])[0]
        for i in range(n):
            e = m[8 + 52 * i: 8 + 52 * (i + 1)]
            digest, off, length, crc = e[:32].hex(), *struct.unpack("<QQI", e[32:])
            found.append(digest)
            if mode == "check":
                c = data[off:off + length]
                if len(c) != length or zlib.crc32(c) != crc or hashlib.sha256(c).hexdigest() != digest:
                    bad.append("object " + name[:-4] + " chunk " + digest)
if mode == "check":
    print(len(found), len(bad), " ".join(bad[:5]))
else:
    print("\n".join(sorted(set(found))))
PY
}
check_chunks() { chunks_py check; }
e2e_stop_pid shoal
find "$root/chunks" -mindepth 1 -maxdepth 1 ! -name tmp -exec rm -rf {} +
shoal_config true
# Every chunk on disk (own file or whole-file object), by digest.
chunk_files() { chunks_py list; }
kills=0 lost=0 corrupt=0 before=
# lost_since_kill: chunks acknowledged (under their final name) before the
# last kill that a restarted daemon no longer has.
lost_since_kill() { comm -23 <(echo "$before") <(chunk_files) | grep -c . || true; }
for i in 1 2 3 4 5; do
  start_shoal
  gone=$(lost_since_kill)
  lost=$((lost + gone))
  [ "$i" = 1 ] || echo "  restarted: $gone of them lost" >>"$E2E_DIR/crash.log"
  sleep "0.$((3 + RANDOM % 7))"
  before=$(chunk_files)
  kill -KILL "$(e2e_pid_of shoal)"
  e2e_stop_pid shoal 2>/dev/null
  kills=$((kills + 1))
  read -r n nbad badnames < <(check_chunks)
  corrupt=$((corrupt + nbad))
  echo "kill $i: $(grep -c . <<<"$before") chunks acknowledged; after: $n files, $nbad bad ${badnames:-}" >>"$E2E_DIR/crash.log"
done
shoal_config false
start_shoal
gone=$(lost_since_kill)
lost=$((lost + gone))
echo "  restarted: $gone of them lost" >>"$E2E_DIR/crash.log"
if [ "$corrupt" -eq 0 ] && [ "$lost" -eq 0 ] && d1=$(check_read 1) && d2=$(check_read 2) &&
  files=$(chunk_files | wc -l) &&
  [ "$(status_json | jq '.cache.chunks')" -eq "$files" ]; then
  pass "crash: $kills x kill -9 while writing chunks: no bad chunk file, none lost ($(grep -c acknowledged "$E2E_DIR/crash.log") kills, last: $(grep acknowledged "$E2E_DIR/crash.log" | tail -n 1 | cut -d: -f2-)); both images read back equal; index = $files files"
else
  fail "crash" "$(cat "$E2E_DIR/crash.log"); ${d1:-} ${d2:-}"
fi

# --- passthrough ----------------------------------------------------------------
# Mount both layers afresh (an inode keeps the mode of its first open for the
# mount's life, and check_read opened every file above), let the background
# fetch lay the large files out, then read everything through the mounts.
e2e_stop_pid shoal
e2e_stop_fdholder "$root"
e2e_unmount_all_under "$root"
shoal_config true
log_from=$(($(wc -l <"$E2E_DIR/logs/shoal.log") + 1))
start_shoal
for _ in $(seq 1 300); do
  [ "$(tail -n +"$log_from" "$E2E_DIR/logs/shoal.log" | grep -c 'laid out for kernel passthrough')" -ge 2 ] && break
  sleep 1
done
big=$(find "$src2" -type f -size +1048575c -printf '%i\n' | sort -u | wc -l)
pt_inodes() { grep -c '^P ' "$(dirname "$(mnt "$1")")/iomodes" || true; }
if d1=$(check_read 1) && d2=$(check_read 2) && p1=$(pt_inodes "$layer1") && p2=$(pt_inodes "$layer2") &&
  [ "$p1" -ge 1 ] && [ "$p2" -ge "$big" ]; then
  pass "passthrough: both images read back equal; $p1 and $p2 inodes served by kernel passthrough ($big files >= 1 MiB in py:2)"
else
  fail "passthrough: reads" "p1=${p1:-} p2=${p2:-} big=$big ${d1:-} ${d2:-}"
fi
m=$(metrics || true)
ptf=$(awk '$1 == "shoal_passthrough_files_total" {print $2}' <<<"$m")
objs=$(awk '$1 == "shoal_file_objects" {print $2}' <<<"$m")
if [ "${ptf:-0}" -ge $((${p1:-0} + ${p2:-0})) ] && [ "${objs:-0}" -ge "$big" ]; then
  pass "passthrough: metrics shoal_passthrough_files_total = $ptf, shoal_file_objects = $objs"
else
  fail "passthrough: metrics" "shoal_passthrough_files_total=${ptf:-none} shoal_file_objects=${objs:-none}"
fi
# kill -9: the resumed mounts keep each inode's mode and read back equal.
kill -KILL "$(e2e_pid_of shoal)"
e2e_stop_pid shoal 2>/dev/null
start_shoal
if d1=$(check_read 1) && d2=$(check_read 2) && [ "$(pt_inodes "$layer2")" = "$p2" ] &&
  ! tail -n +"$log_from" "$E2E_DIR/logs/shoal.log" | grep -q "backing file of a passthrough inode is gone"; then
  pass "passthrough: after kill -9 the resumed mounts read back equal, $p2 passthrough inodes kept"
else
  fail "passthrough: after kill -9" "${d1:-} ${d2:-} $(pt_inodes "$layer2")"
fi
n=$(check_chunks)
[ "$(cut -d' ' -f2 <<<"$n")" = 0 ] && pass "passthrough: every chunk on disk (files and objects) hashes to its digest ($(cut -d' ' -f1 <<<"$n") chunks)" ||
  fail "passthrough: bad chunks" "$n"

# --- full disk -----------------------------------------------------------------
e2e_stop_pid shoal
find "$root/chunks" -mindepth 1 -maxdepth 1 ! -name tmp -exec rm -rf {} +
mount -t tmpfs -o size=8m,mode=0700 shoal-e2e-full "$root/chunks"
start_shoal
crun_out=$(E2E_CTR_TIMEOUT=120 e2e_ctr run --rm --snapshotter shoal "$ref2-esgz" cache-full \
  python3 -c 'import yaml; print("hello", yaml.safe_load("a: 1")["a"])' 2>&1) || true
if [ "$crun_out" = "hello 1" ] && d1=$(check_read 1) && d2=$(check_read 2); then
  pass "full disk (8 MiB tmpfs): container ran (python3 + yaml) and both images read back equal"
else
  fail "full disk: container and reads" "${crun_out} ${d1:-} ${d2:-}"
fi
m=$(metrics || true)
werr=$(awk '$1 == "shoal_fallbacks_total{reason=\"cache_write_error\"}" {print $2}' <<<"$m")
if [ "${werr:-0}" -gt 0 ] && grep -q "CHUNK CACHE FULL" "$E2E_DIR/logs/shoal.log" &&
  status_json | jq -e '.cache.write_failures > 0 and .cache.last_full > 0' >/dev/null; then
  pass "full disk: metric shoal_fallbacks_total{reason=\"cache_write_error\"} = $werr; log says CHUNK CACHE FULL ($(grep -c "CHUNK CACHE FULL" "$E2E_DIR/logs/shoal.log") lines, rate-limited)"
else
  fail "full disk: metric and log" "metric ${werr:-none}; log: $(grep -c "CHUNK CACHE FULL" "$E2E_DIR/logs/shoal.log" || true) lines"
fi
n=$(check_chunks | cut -d' ' -f2)
[ "$n" = 0 ] && pass "full disk: no bad chunk file on the full tmpfs" || fail "full disk: bad chunk files" "$n"
e2e_stop_pid shoal
umount "$root/chunks"

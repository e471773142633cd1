#!/usr/bin/env bash
# Read throughput through Shoal's FUSE mount against the same file in an
# unpacked layer on the same disk, both read through a read-only overlayfs
# (as a container reads), and the daemon's memory with the python3 image and
# with a 100k-file layer mounted. Prints figures and ratios; asserts nothing.
# Needs root (containerd, mounts, drop_caches).
#
#   tests/bench/read.sh [--no-build] [--size MIB] [--runs N] [--readahead-kb KB]
#
#   cold: chunks all in the store, daemon restarted (memory cache empty),
#         `echo 3 > /proc/sys/vm/drop_caches` before each read;
#   warm: the same file read again (kernel page cache hot).
#   shoal: the default: once the background fetch has made the layer local,
#         large files are laid out as whole-file objects and served by
#         kernel passthrough (the FUSE mount's inode reads the object file).
#   shoal-fuse: the FUSE read path (passthrough = false, layer mounted
#         afresh): reads go through the daemon and the FUSE page cache, with
#         the mount's read_ahead_kb set to KB (default 4096, as the daemon
#         sets it; pass --readahead-kb 128 for the kernel's FUSE default).
# Targets (issue 4): warm >= 0.9x native, cold >= 0.5x native and >= 1 GB/s.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=1 size_mib=512 runs=3 ra_kb=4096
while [ $# -gt 0 ]; do
  case $1 in
    --no-build) build=0 ;;
    --size) size_mib=$2; shift ;;
    --runs) runs=$2; shift ;;
    --readahead-kb) ra_kb=$2; shift ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "read.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

export E2E_QUIET=1
# shellcheck source=tests/e2e/lib.sh
source "$repo/tests/e2e/lib.sh"
say() { printf 'bench: %s\n' "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
if [ "$build" = 1 ]; then (cd "$repo" && cargo build --release --bins) || die "build failed"; fi
ROOTFS=$("$repo/tests/e2e/rootfs.sh") || die "no python3 root filesystem (tests/e2e/rootfs.sh)"

e2e_world_start
sock="$E2E_DIR/shoal.sock" root="$E2E_DIR/shoal" cli="$repo/target/release/shoal"
config="$E2E_DIR/shoal-config.toml"
cat >"$config" <<TOML
version = 1
[remote]
background_fetch = true
background_delay_secs = 0
TOML
start_shoal() {
  rm -f "$sock"
  e2e_start shoal "$E2E_SHOAL_BIN" --root "$root" --address "$sock" --config "$config" --log-level info
  e2e_wait_for shoal "its socket" e2e_sock_ready "$sock"
  # containerd's proxy client reconnects by itself.
  for _ in $(seq 1 50); do
    e2e_ctr snapshots --snapshotter shoal ls >/dev/null 2>&1 && return 0
    sleep 0.2
  done
}
e2e_stop_pid shoal
start_shoal
ctr_remote() { timeout 1200 ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" "$@"; }
oci="$E2E_DIR/oci"
umoci init --layout "$oci"

# image TAG SETUP-FUNCTION: one-layer image whose rootfs SETUP fills; pushed
# as TAG and converted to TAG-esgz. Leaves the unpacked rootfs in bundle-TAG.
image() {
  local tag=$1 fill=$2 bundle="$E2E_DIR/bundle-$1"
  umoci new --image "$oci:$tag"
  umoci unpack --image "$oci:$tag" "$bundle" >/dev/null
  "$fill" "$bundle/rootfs"
  umoci repack --refresh-bundle --image "$oci:$tag" "$bundle" >/dev/null
  skopeo copy -q "oci:$oci:$tag" "docker://$E2E_REGISTRY/bench:$tag" --dest-tls-verify=false
  e2e_ctr image pull -q --plain-http "$E2E_REGISTRY/bench:$tag" >/dev/null
  ctr_remote image convert --estargz --oci "$E2E_REGISTRY/bench:$tag" "$E2E_REGISTRY/bench:$tag-esgz" >/dev/null
  e2e_ctr image push --plain-http "$E2E_REGISTRY/bench:$tag-esgz" >/dev/null
}
layer_of() {
  curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$E2E_REGISTRY/v2/bench/manifests/$1-esgz" | jq -r '.layers[0].digest'
}
mnt() { awk -v f="shoal:$1" '$1 == f {print $2; exit}' /proc/mounts; }
rpull() { ctr_remote image rpull --plain-http --snapshotter shoal "$E2E_REGISTRY/bench:$1-esgz" >/dev/null; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$(e2e_pid_of shoal)/status"; }

fill_big() { head -c $((size_mib << 20)) /dev/urandom >"$1/big.bin"; }
fill_py() { cp -a "$ROOTFS/." "$1/"; }
fill_many() {
  local d
  for d in $(seq -w 0 99); do
    mkdir -p "$1/d$d"
    (cd "$1/d$d" && seq -w 0 999 | xargs -n 500 touch && for f in 0*; do echo "$d$f" >"$f"; done)
  done
}

say "building images: big ($size_mib MiB random file), python3, 100k files"
t0=$SECONDS
image big fill_big
image py fill_py
image many fill_many
say "images ready in $((SECONDS - t0))s"

# --- throughput --------------------------------------------------------------
rpull big
big_layer=$(layer_of big)
say "waiting for the background fetch to store every chunk of the big layer"
for _ in $(seq 1 600); do
  done_=$("$cli" status --address "$sock" --json |
    jq --arg l "$big_layer" '.layers[] | select(.layer_digest == $l) | .bytes_local == .bytes_total')
  [ "$done_" = true ] && break
  sleep 1
done
[ "$done_" = true ] || die "background fetch did not finish"
say "waiting for the big file to be laid out for passthrough"
for _ in $(seq 1 300); do
  grep -q "laid out for kernel passthrough.*$big_layer" "$E2E_DIR/logs/shoal.log" && break
  sleep 1
done
grep -q "laid out for kernel passthrough.*$big_layer" "$E2E_DIR/logs/shoal.log" ||
  die "the big file was never laid out for passthrough (see $E2E_DIR/logs/shoal.log)"
empty="$E2E_DIR/empty" ov="$E2E_DIR/ov"
mkdir -p "$empty" "$ov"
# read_mbps DIR: MB/s of one sequential read of DIR/big.bin.
read_mbps() {
  local t0 t1
  t0=$(date +%s.%N)
  dd if="$1/big.bin" of=/dev/null bs=1M status=none
  t1=$(date +%s.%N)
  awk -v b=$((size_mib << 20)) -v t0="$t0" -v t1="$t1" 'BEGIN {printf "%.0f", b / (t1 - t0) / 1e6}'
}
median() { tr ' ' '\n' | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
# one_read LOWER: appends one cold and one warm MB/s through an overlay on
# LOWER to the arrays named by $2 and $3.
one_read() {
  local -n c=$2 w=$3
  mount -t overlay overlay -o "ro,lowerdir=$1:$empty" "$ov"
  sync
  echo 3 >/proc/sys/vm/drop_caches
  c+=("$(read_mbps "$ov")")
  read_mbps "$ov" >/dev/null
  w+=("$(read_mbps "$ov")")
  umount "$ov"
}
# measure PREFIX: RUNS rounds, each restarting the daemon (memory cache
# empty) and then reading native and Shoal back to back, so both see the
# same machine load (this VM shares its cores). Sets PREFIX_cold/warm
# (Shoal), native_cold/warm (appended) and PREFIX_rcold/rwarm (per-round
# Shoal/native ratios). No subshell: daemons restarted here must stay known
# to this shell.
measure() {
  local p=$1 i lower
  local -n sc_=${p}_cold sw_=${p}_warm rc_=${p}_rcold rw_=${p}_rwarm
  local nc_=() nw_=()
  for i in $(seq 1 "$runs"); do
    e2e_stop_pid shoal
    start_shoal
    for _ in $(seq 1 100); do [ -n "$(mnt "$big_layer")" ] && break; sleep 0.1; done
    lower=$(mnt "$big_layer")
    if [ -n "${RA:-}" ]; then
      echo "$RA" >"/sys/class/bdi/$(mountpoint -d "$lower")/read_ahead_kb"
    fi
    one_read "$E2E_DIR/bundle-big/rootfs" nc_ nw_
    one_read "$lower" sc_ sw_
    rc_+=("$(ratio "${sc_[-1]}" "${nc_[-1]}")")
    rw_+=("$(ratio "${sw_[-1]}" "${nw_[-1]}")")
    native_cold+=("${nc_[-1]}") native_warm+=("${nw_[-1]}")
  done
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
native_cold=() native_warm=()
shoal_cold=() shoal_warm=() shoal_rcold=() shoal_rwarm=()
fuse_cold=() fuse_warm=() fuse_rcold=() fuse_rwarm=()
measure shoal
# Which path served it: the mount's I/O mode log (P = passthrough inode).
iomodes="$(dirname "$(mnt "$big_layer")")/iomodes"
pt_inodes=$(grep -c '^P ' "$iomodes" || true)
# The FUSE read path: passthrough off, layer mounted afresh (a resumed mount
# keeps its inodes' modes), chunks read from the store by the daemon.
e2e_stop_pid shoal
e2e_stop_fdholder
e2e_unmount_all_under "$root"
sed -i 's/^background_delay_secs = 0$/&\npassthrough = false/' "$config"
RA=$ra_kb measure fuse
sed -i '/^passthrough = false$/d' "$config"

m() { echo "$@" | median; }
echo
echo "Read throughput, $size_mib MiB file, through a read-only overlayfs, MB/s (median of $runs rounds;"
echo "each round reads native and Shoal back to back; ratio = median of the per-round ratios)"
printf '%-6s %8s %8s %7s %11s %7s\n' "" native shoal ratio shoal-fuse ratio
printf '%-6s %8s %8s %7s %11s %7s   target >= 0.5x and >= 1000 MB/s\n' cold "$(m "${native_cold[@]}")" \
  "$(m "${shoal_cold[@]}")" "$(m "${shoal_rcold[@]}")" "$(m "${fuse_cold[@]}")" "$(m "${fuse_rcold[@]}")"
printf '%-6s %8s %8s %7s %11s %7s   target >= 0.9x\n' warm "$(m "${native_warm[@]}")" \
  "$(m "${shoal_warm[@]}")" "$(m "${shoal_rwarm[@]}")" "$(m "${fuse_warm[@]}")" "$(m "${fuse_rwarm[@]}")"
echo "(shoal: kernel passthrough, $pt_inodes passthrough inode(s) on the mount; shoal-fuse: passthrough off, FUSE read_ahead_kb = $ra_kb)"
echo "runs (MB/s): native cold ${native_cold[*]}, warm ${native_warm[*]}"
echo "             shoal cold ${shoal_cold[*]}, warm ${shoal_warm[*]}"
echo "             shoal-fuse cold ${fuse_cold[*]}, warm ${fuse_warm[*]}"

# --- memory --------------------------------------------------------------------
e2e_stop_pid shoal
sed -i 's/background_fetch = true/background_fetch = false/' "$config"
start_shoal
r0=$(rss_kib)
rpull py
r1=$(rss_kib)
(cd "$(mnt "$(layer_of py)")" && find . -type f -print0 | xargs -0 cat >/dev/null)
r2=$(rss_kib)
rpull many
r3=$(rss_kib)
files=$(find "$(mnt "$(layer_of many)")" -type f | wc -l)
r4=$(rss_kib)
echo
echo "Daemon RSS (VmRSS, MiB; memory_cache_bytes = 256 MiB default, background fetch off)"
awk -v a="$r0" -v b="$r1" -v c="$r2" -v d="$r3" -v e="$r4" -v f="$files" 'BEGIN {
  printf "  started, big layer mounted:              %6.1f\n", a / 1024
  printf "  + python3 image mounted:                 %6.1f\n", b / 1024
  printf "  + every python3 file read:               %6.1f\n", c / 1024
  printf "  + 100k-file layer mounted:               %6.1f\n", d / 1024
  printf "  + all %d files of it listed (stat):   %6.1f\n", f, e / 1024
}'

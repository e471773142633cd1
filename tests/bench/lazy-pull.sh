#!/usr/bin/env bash
# Shoal's lazy-pull benchmark (a program that prints figures, not a test that
# passes or fails on timing). Needs root. Measures, from pull start to the
# container's first line of output, `python3 -c "print('hello')"` in a
# Debian bookworm + python3 image served by a registry behind a shaped link:
#
#   overlayfs  ctr image pull --plain-http REF (full pull of the gzip image),
#              then ctr run --rm REF ...
#   shoal      ctr-remote image rpull --plain-http --snapshotter shoal ESGZ_REF
#              (the same image converted with ctr-remote image convert
#              --estargz --oci), then ctr run --rm --snapshotter shoal ...
#   shoal-profile  Shoal on its own format with a recorded startup profile:
#              `shoal optimize` (convert, run the workload once, record,
#              convert with the profile) makes PROF_REF before the link is
#              shaped; measured like shoal, on a fresh Shoal root
#   stargz     the same with stargz-snapshotter 0.12 ("the alternative"):
#              Debian ships its library and ctr-remote but not its daemon, so
#              tests/bench/stargz-grpc/main.go wires the library to a socket
#              like upstream's containerd-stargz-grpc (built with Debian's Go
#              sources, cached; skipped when golang-go or
#              golang-github-containerd-stargz-snapshotter-dev is missing)
#
# and the bytes the registry sent for each (tx_bytes of the registry's side of
# the veth). The last line is machine-readable:
#
#   bench: rate=100mbit latency_ms=0 overlayfs=14.1s shoal=1.2s ratio=0.085 overlayfs_bytes=N shoal_bytes=N
#          stargz=1.1s stargz_ratio=0.078 stargz_bytes=N
#          overlayfs_http_bytes=N shoal_http_bytes=N stargz_http_bytes=N
#          overlayfs_requests=N shoal_requests=N stargz_requests=N
#          overlayfs_warm=0.3s shoal_warm=0.4s stargz_warm=0.3s
#          image_bytes=N layer_bytes=N esgz_layer_bytes=N runs=1   (one line)
#
# *_bytes: what the registry side of the veth sent (tx_bytes, headers
# included) by the first "hello"; *_http_bytes: response bodies in the
# registry access log by then; *_requests: requests in that log by then
# (manifests and blobs, GET and HEAD, whoever sent them: containerd and the
# snapshotter); *_warm: a second run of the now-local image.
#
# Usage: tests/bench/lazy-pull.sh [options]
#   --rate RATE     link rate, tc syntax (default 100mbit)
#   --burst SIZE    tbf burst, tc syntax (default: 10 ms worth of RATE, >=32kb)
#   --latency-ms N  add N ms to every round trip (so to every request/response)
#                   with tests/bench/delayproxy.py, a userspace TCP proxy that
#                   forwards each byte N/2 ms late in each direction; it runs
#                   in the registry's namespace on the registry's address,
#                   in front of the registry (then on 127.0.0.1:5001), so it
#                   sits between the shaped link and the registry (default 0:
#                   no proxy)
#   --runs N        measure each snapshotter N times, report the median (default 1)
#   --only LIST     comma-separated subset of overlayfs,shoal,shoal-profile,stargz
#                   (default: all three; stargz only where it can be built)
#   --no-stargz     don't measure stargz-snapshotter
#   --workload W    hello (default): python3 -c "print('hello')";
#                   imports: python3 importing every stdlib module it can
#                   (pkgutil.walk_packages, ~545 modules), then printing hello
#   --shoal-no-background-fetch
#                   run Shoal with [remote] background_fetch = false (what
#                   the startup costs without the background fetch competing
#                   for the link; stargz 0.12 starts its own only after 30 s
#                   of silence)
#   --no-build      don't run cargo build --release --bins first
#   --drop-caches   also drop the host page cache before each measurement
#   --keep          keep the temp dir (logs) after the run
#
# The world (all removed at exit, by pid / by name made here):
#   - network namespace shoalbench-$$ with a veth pair in a private /30 under
#     10.213.0.0/16, a tbf qdisc on both ends; docker-registry listens inside
#     the namespace on NS_IP:5000;
#   - a private containerd (tests/e2e/lib.sh) with Shoal as proxy plugin;
#   - shoal-snapshotter with a config file whose [registry] config_path holds
#     a hosts.toml that says http:// for the registry; a fresh --root for
#     every Shoal measurement (the same for stargz-grpc).
# Between measurements every image is removed with a synchronous GC, so each
# one starts with empty content and snapshot stores.
#
# The image is built once and cached under $SHOAL_BENCH_CACHE (default
# /var/cache/shoal-bench): debootstrap --variant=minbase --include=python3
# bookworm (a few minutes the first time), packed as one gzip layer by umoci,
# and its eStargz conversion. debootstrap leaves the downloaded .debs in
# /var/cache/apt/archives; they stay in the image, which is how the 261 MB
# figure in the design brief was measured (data a container never reads).
set -euo pipefail
umask 022

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

rate=100mbit
burst=
runs=1
only=
build=1
drop_caches=0
stargz=1
shoal_bg=true
workload=hello
latency_ms=0
while [ $# -gt 0 ]; do
  case $1 in
    --rate) rate=${2:?--rate needs a value}; shift ;;
    --rate=*) rate=${1#*=} ;;
    --burst) burst=${2:?--burst needs a value}; shift ;;
    --burst=*) burst=${1#*=} ;;
    --latency-ms) latency_ms=${2:?--latency-ms needs a value}; shift ;;
    --latency-ms=*) latency_ms=${1#*=} ;;
    --runs) runs=${2:?--runs needs a value}; shift ;;
    --runs=*) runs=${1#*=} ;;
    --only) only=${2:?--only needs a value}; shift ;;
    --only=*) only=${1#*=} ;;
    --no-build) build=0 ;;
    --drop-caches) drop_caches=1 ;;
    --no-stargz) stargz=0 ;;
    --workload) workload=${2:?--workload needs a value}; shift ;;
    --workload=*) workload=${1#*=} ;;
    --shoal-no-background-fetch) shoal_bg=false ;;
    --keep) export E2E_KEEP=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "lazy-pull.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
want=(overlayfs shoal shoal-profile stargz)
if [ -n "$only" ]; then
  IFS=, read -r -a want <<<"$only"
  for w in "${want[@]}"; do
    case $w in overlayfs | shoal | shoal-profile | stargz) ;; *) echo "lazy-pull.sh: --only takes overlayfs,shoal,shoal-profile,stargz" >&2; exit 2 ;; esac
  done
fi
wants() { local w; for w in "${want[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1; }
wants stargz || stargz=0
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "lazy-pull.sh: --runs must be a positive integer" >&2; exit 2; }
[[ $latency_ms =~ ^[0-9]+$ ]] || { echo "lazy-pull.sh: --latency-ms must be a whole number of milliseconds" >&2; exit 2; }

CACHE=${SHOAL_BENCH_CACHE:-/var/cache/shoal-bench}
SUITE=bookworm
MIRROR=${SHOAL_BENCH_MIRROR:-http://deb.debian.org/debian}
ROOTFS=$CACHE/rootfs-$SUITE-python3
OCI=$CACHE/oci
TAG=python3           # the gzip image in $OCI
ESGZ_TAG=python3-esgz # its eStargz conversion in $OCI
IMPORTS_PY='import importlib, pkgutil, warnings
warnings.simplefilter("ignore")
skip = {"antigravity", "this", "__main__", "idlelib", "tkinter", "turtle", "turtledemo", "test", "ensurepip", "venv", "pydoc_data"}
for m in pkgutil.walk_packages(onerror=lambda name: None):
    if m.name.split(".")[0] in skip:
        continue
    try:
        importlib.import_module(m.name)
    except BaseException:
        pass
print("hello")'
case $workload in
  hello) HELLO_CMD=(python3 -c "print('hello')") ;;
  imports) HELLO_CMD=(python3 -c "$IMPORTS_PY") ;;
  *) echo "lazy-pull.sh: --workload takes hello or imports" >&2; exit 2 ;;
esac
STARGZ_BIN=$CACHE/stargz-grpc

# Quiet e2e lib: our own messages say what failed.
export E2E_CTR_TIMEOUT=${E2E_CTR_TIMEOUT:-1800}
export E2E_SHOAL_BIN=${E2E_SHOAL_BIN:-$repo/target/release/shoal-snapshotter}
# shellcheck source=tests/e2e/lib.sh
source "$repo/tests/e2e/lib.sh"

say() { printf 'bench: %s\n' "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (netns, containerd, mounts)"

# ---------------------------------------------------------------------------
# Tools

need_tools() {
  local t missing=()
  for t in debootstrap umoci skopeo ctr ctr-remote containerd docker-registry runc ip tc jq; do
    command -v "$t" >/dev/null || missing+=("$t")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local pkgs=() p
  for t in "${missing[@]}"; do
    case $t in
      ctr | containerd) p=containerd ;;
      ctr-remote) p=stargz-snapshotter ;;
      ip | tc) p=iproute2 ;;
      *) p=$t ;;
    esac
    pkgs+=("$p")
  done
  say "installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; }
}

# ---------------------------------------------------------------------------
# The image, cached

build_rootfs() {
  [ -f "$CACHE/rootfs.done" ] && [ -d "$ROOTFS" ] && return 0
  say "building the Debian $SUITE + python3 root filesystem with debootstrap into $ROOTFS"
  say "(the first build downloads ~100 MB from $MIRROR and takes a few minutes)"
  rm -rf --one-file-system "$ROOTFS.partial" "$ROOTFS"
  mkdir -p "$CACHE"
  local start=$SECONDS
  debootstrap --variant=minbase --include=python3 "$SUITE" "$ROOTFS.partial" "$MIRROR" 2>&1 |
    stdbuf -oL awk '/^I: (Retrieving|Validating|Extracting|Installing|Configuring|Unpacking)/ { n++; if (n % 25) next }
                    { print "  debootstrap: " $0; fflush() }' >&2
  [ "${PIPESTATUS[0]}" = 0 ] || die "debootstrap failed"
  chroot "$ROOTFS.partial" python3 -c 'pass' || die "python3 does not run in the new root filesystem"
  mv "$ROOTFS.partial" "$ROOTFS"
  touch "$CACHE/rootfs.done"
  say "root filesystem ready in $((SECONDS - start))s: $(du -sh "$ROOTFS" | cut -f1)"
}

# build_oci: $OCI:$TAG, one gzip layer holding the whole root filesystem.
build_oci() {
  if [ -f "$CACHE/oci.done" ] && skopeo inspect --raw "oci:$OCI:$TAG" >/dev/null 2>&1; then
    return 0
  fi
  say "packing the root filesystem into one gzip layer with umoci ($OCI:$TAG)"
  rm -f "$CACHE/oci.done" "$CACHE/esgz.done"
  rm -rf --one-file-system "$OCI" "$CACHE/bundle"
  umoci init --layout "$OCI"
  umoci new --image "$OCI:$TAG"
  umoci config --image "$OCI:$TAG" \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env LANG=C.UTF-8 --config.cmd python3 --config.workingdir /
  umoci unpack --image "$OCI:$TAG" "$CACHE/bundle"
  cp -a "$ROOTFS/." "$CACHE/bundle/rootfs/"
  umoci repack --history.comment "debootstrap --variant=minbase --include=python3 $SUITE" \
    --image "$OCI:$TAG" "$CACHE/bundle"
  rm -rf --one-file-system "$CACHE/bundle"
  umoci gc --layout "$OCI"
  touch "$CACHE/oci.done"
}

# build_stargz: $STARGZ_BIN from tests/bench/stargz-grpc (GOPATH mode over
# Debian's Go sources; no network). Sets stargz=0 when it cannot be built.
build_stargz() {
  local src=$here/stargz-grpc
  if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/github.com/containerd/stargz-snapshotter/fs ]; then
    say "stargz: skipped (needs golang-go and golang-github-containerd-stargz-snapshotter-dev)"
    stargz=0
    return 0
  fi
  if [ -x "$STARGZ_BIN" ] && [ "$STARGZ_BIN" -nt "$src/main.go" ]; then return 0; fi
  say "stargz: building stargz-grpc from Debian's stargz-snapshotter sources (a minute the first time)"
  mkdir -p "$CACHE/go-build"
  if ! (cd "$src" && GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=$CACHE/go-build GOFLAGS= \
    go build -o "$STARGZ_BIN.new" .) >"$CACHE/stargz-build.log" 2>&1; then
    tail -n 20 "$CACHE/stargz-build.log" >&2
    say "stargz: build failed (log in $CACHE/stargz-build.log); skipped"
    stargz=0
    return 0
  fi
  mv "$STARGZ_BIN.new" "$STARGZ_BIN"
}

# manifest_of TAG: the image manifest JSON in the OCI layout.
manifest_of() { skopeo inspect --raw "oci:$OCI:$1"; }

# ---------------------------------------------------------------------------
# Network: registry in its own namespace behind a shaped veth pair

NETNS=shoalbench-$$
VETH_HOST=sbh$$
VETH_NS=sbn$$
net_made=0

# rate_bits RATE: tc rate (100mbit, 1gbit, 500kbit, 12mbps, 1000000) in bit/s.
rate_bits() {
  local v=${1,,} n unit
  [[ $v =~ ^([0-9]+(\.[0-9]+)?)([a-z]*)$ ]] || die "cannot parse rate $1"
  n=${BASH_REMATCH[1]} unit=${BASH_REMATCH[3]}
  case $unit in
    "" | bit) awk -v n="$n" 'BEGIN { printf "%d", n }' ;;
    kbit) awk -v n="$n" 'BEGIN { printf "%d", n * 1000 }' ;;
    mbit) awk -v n="$n" 'BEGIN { printf "%d", n * 1000000 }' ;;
    gbit) awk -v n="$n" 'BEGIN { printf "%d", n * 1000000000 }' ;;
    bps) awk -v n="$n" 'BEGIN { printf "%d", n * 8 }' ;;
    kbps) awk -v n="$n" 'BEGIN { printf "%d", n * 8000 }' ;;
    mbps) awk -v n="$n" 'BEGIN { printf "%d", n * 8000000 }' ;;
    gbps) awk -v n="$n" 'BEGIN { printf "%d", n * 8000000000 }' ;;
    *) die "unknown rate unit in $1 (use bit, kbit, mbit, gbit, bps, kbps, mbps, gbps)" ;;
  esac
}

net_setup() {
  # A /30 under 10.213.0.0/16 derived from our pid; refuse if it is in use.
  local third=$((($$ / 64) % 256)) fourth=$((($$ % 64) * 4))
  HOST_IP=10.213.$third.$((fourth + 1))
  NS_IP=10.213.$third.$((fourth + 2))
  if ip -4 -o addr show | grep -Eq "inet 10\.213\.$third\.($((fourth + 1))|$((fourth + 2)))/"; then
    die "address $HOST_IP or $NS_IP is already in use"
  fi
  say "network: namespace $NETNS, veth $VETH_HOST ($HOST_IP) <-> $VETH_NS ($NS_IP), registry at $NS_IP:5000"
  ip netns add "$NETNS"
  net_made=1
  ip link add "$VETH_HOST" type veth peer name "$VETH_NS" netns "$NETNS"
  ip addr add "$HOST_IP/30" dev "$VETH_HOST"
  ip link set "$VETH_HOST" up
  ip -n "$NETNS" link set lo up
  ip -n "$NETNS" addr add "$NS_IP/30" dev "$VETH_NS"
  ip -n "$NETNS" link set "$VETH_NS" up
}

# net_shape: tbf on both ends (registry->host is the download direction; the
# host side shapes requests and ACKs).
net_shape() {
  local bits b
  bits=$(rate_bits "$rate")
  if [ -z "$burst" ]; then
    b=$((bits / 8 / 100)) # 10 ms at the rate
    [ "$b" -ge 32768 ] || b=32768
    burst=$b
  fi
  tc qdisc replace dev "$VETH_HOST" root tbf rate "$rate" burst "$burst" latency 50ms
  ip netns exec "$NETNS" tc qdisc replace dev "$VETH_NS" root tbf rate "$rate" burst "$burst" latency 50ms
  say "link shaped: tbf rate $rate burst $burst latency 50ms on both veth ends"
}

net_unshape() {
  tc qdisc del dev "$VETH_HOST" root 2>/dev/null || true
  ip netns exec "$NETNS" tc qdisc del dev "$VETH_NS" root 2>/dev/null || true
}

# registry_tx: bytes the registry's side of the veth has sent.
registry_tx() { ip netns exec "$NETNS" cat "/sys/class/net/$VETH_NS/statistics/tx_bytes"; }

net_teardown() {
  [ "$net_made" = 1 ] || return 0
  ip link del "$VETH_HOST" 2>/dev/null || true
  ip netns del "$NETNS" 2>/dev/null || true
  net_made=0
}

# ---------------------------------------------------------------------------
# The world: registry (in the namespace), containerd, shoal-snapshotter

bench_cleanup() {
  local status=$1
  if [ "$status" != 0 ]; then
    for name in shoal stargz containerd registry; do e2e_tail_log "$name" 12; done
  fi
  # e2e_cleanup knows containerd, shoal and the registry; stargz-grpc goes
  # first, after the containers that use its mounts.
  if [ -n "$E2E_DIR" ] && e2e_pid_of stargz >/dev/null; then
    if e2e_pid_of containerd >/dev/null; then e2e_stop_leftover_tasks; fi
    e2e_stop_pid stargz
  fi
  E2E_QUIET=1 e2e_cleanup "$status" || true
  net_teardown
  return "$status"
}

registry_up() {
  (
    exec 3<>"/dev/tcp/$NS_IP/5000" || exit 1
    printf 'GET /v2/ HTTP/1.0\r\nHost: %s:5000\r\n\r\n' "$NS_IP" >&3
    IFS= read -r -t 5 status <&3 || exit 1
    case $status in *" 200 "*) exit 0 ;; *) exit 1 ;; esac
  ) 2>/dev/null
}

start_registry() {
  local registry_addr=$NS_IP:5000
  [ "$latency_ms" = 0 ] || registry_addr=127.0.0.1:5001
  mkdir -p "$E2E_DIR/registry/data"
  cat >"$E2E_DIR/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false # combined log format on stdout: response bytes per request
storage:
  filesystem:
    rootdirectory: $E2E_DIR/registry/data
  delete:
    enabled: true
http:
  addr: $registry_addr
EOF
  e2e_start registry ip netns exec "$NETNS" docker-registry serve "$E2E_DIR/registry/config.yml"
  if [ "$latency_ms" -gt 0 ]; then
    e2e_start delayproxy ip netns exec "$NETNS" python3 -u "$here/delayproxy.py" \
      --listen "$NS_IP:5000" --upstream "$registry_addr" --rtt-ms "$latency_ms"
    say "delay proxy: $NS_IP:5000 -> registry at $registry_addr in the namespace, +$latency_ms ms per round trip"
  fi
  e2e_wait_for registry "HTTP on $NS_IP:5000" registry_up
  REGISTRY=$NS_IP:5000
}

# The hosts.toml directory Shoal reads: plain HTTP for our registry.
write_hosts_config() {
  CERTS_D=$E2E_DIR/certs.d
  mkdir -p "$CERTS_D/$REGISTRY"
  cat >"$CERTS_D/$REGISTRY/hosts.toml" <<EOF
server = "http://$REGISTRY"

[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
EOF
  cat >"$E2E_DIR/shoal.toml" <<EOF
version = 1

[remote]
background_fetch = $shoal_bg

[registry]
config_path = "$CERTS_D"
EOF
}

shoal_generation=0
SHOAL_ROOT=

# shoal_ready: containerd reaches Shoal. `snapshots ls` would not tell (it
# reads containerd's own metadata); a Prepare goes through to the plugin.
shoal_ready() {
  local key=bench-probe-$RANDOM
  E2E_CTR_TIMEOUT=10 e2e_ctr snapshots --snapshotter shoal prepare "$key" >/dev/null 2>&1 || return 1
  E2E_CTR_TIMEOUT=10 e2e_ctr snapshots --snapshotter shoal rm "$key" >/dev/null 2>&1
}

# restart_shoal: stop shoal-snapshotter (if running), start it on a new, empty
# root, and wait until containerd reaches it.
restart_shoal() {
  e2e_stop_pid shoal
  if [ -n "$SHOAL_ROOT" ]; then
    e2e_stop_fdholder "$SHOAL_ROOT" # the stopped daemon left its mounts to it
    e2e_unmount_all_under "$SHOAL_ROOT"
    rm -rf --one-file-system "$SHOAL_ROOT" 2>/dev/null || true
  fi
  shoal_generation=$((shoal_generation + 1))
  SHOAL_ROOT=$E2E_DIR/shoal-root-$shoal_generation
  mkdir -p "$SHOAL_ROOT"
  rm -f "$E2E_DIR/shoal.sock"
  e2e_start shoal "$E2E_SHOAL_BIN" --config "$E2E_DIR/shoal.toml" --root "$SHOAL_ROOT" \
    --address "$E2E_DIR/shoal.sock" --log-level "${SHOAL_BENCH_LOG_LEVEL:-info,shoal=debug}"
  e2e_wait_for shoal "its socket $E2E_DIR/shoal.sock" e2e_sock_ready "$E2E_DIR/shoal.sock"
  # containerd's proxy client reconnects with backoff.
  e2e_wait_for shoal "containerd to reach it" shoal_ready
}

# start_containerd: e2e_start_containerd, plus a proxy plugin for
# stargz-snapshotter when it is measured.
start_containerd() {
  if [ "$stargz" = 1 ]; then
    E2E_EXTRA_PROXY_PLUGINS="[proxy_plugins.stargz]
  type = \"snapshot\"
  address = \"$E2E_DIR/stargz.sock\""
  fi
  e2e_start_containerd
}

stargz_generation=0
STARGZ_ROOT=

stargz_ready() {
  local key=bench-probe-$RANDOM
  E2E_CTR_TIMEOUT=10 e2e_ctr snapshots --snapshotter stargz prepare "$key" >/dev/null 2>&1 || return 1
  E2E_CTR_TIMEOUT=10 e2e_ctr snapshots --snapshotter stargz rm "$key" >/dev/null 2>&1
}

# restart_stargz: stargz-grpc on a new, empty root.
restart_stargz() {
  e2e_stop_pid stargz
  if [ -n "$STARGZ_ROOT" ]; then
    e2e_unmount_all_under "$STARGZ_ROOT"
    rm -rf --one-file-system "$STARGZ_ROOT" 2>/dev/null || true
  fi
  stargz_generation=$((stargz_generation + 1))
  STARGZ_ROOT=$E2E_DIR/stargz-root-$stargz_generation
  rm -f "$E2E_DIR/stargz.sock"
  e2e_start stargz "$STARGZ_BIN" --root "$STARGZ_ROOT" --address "$E2E_DIR/stargz.sock" \
    --plain-http-registry "$REGISTRY"
  e2e_wait_for stargz "its socket $E2E_DIR/stargz.sock" e2e_sock_ready "$E2E_DIR/stargz.sock"
  e2e_wait_for stargz "containerd to reach it" stargz_ready
}

ctr_remote() {
  timeout "$E2E_CTR_TIMEOUT" ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" "$@"
}

# reset_caches: remove every image and container with a synchronous GC, so
# the content store and every snapshotter are empty.
reset_caches() {
  local id img left
  for id in $(e2e_ctr tasks ls -q 2>/dev/null); do
    e2e_ctr tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    e2e_ctr tasks rm -f "$id" >/dev/null 2>&1 || true
  done
  for id in $(e2e_ctr containers ls -q 2>/dev/null); do
    e2e_ctr containers rm "$id" >/dev/null 2>&1 || true
  done
  for img in $(e2e_ctr images ls -q 2>/dev/null); do
    e2e_ctr images rm --sync "$img" >/dev/null
  done
  left=$(e2e_ctr content ls -q 2>/dev/null | wc -l)
  [ "$left" = 0 ] || say "warning: $left blobs left in containerd's content store after GC"
  left=$(e2e_ctr snapshots --snapshotter overlayfs ls 2>/dev/null | tail -n +2 | wc -l)
  [ "$left" = 0 ] || say "warning: $left overlayfs snapshots left after GC"
  if [ -n "$SHOAL_ROOT" ]; then
    left=$(e2e_ctr snapshots --snapshotter shoal ls 2>/dev/null | tail -n +2 | wc -l)
    [ "$left" = 0 ] || say "warning: $left shoal snapshots left after GC"
  fi
  if [ -n "$STARGZ_ROOT" ]; then
    left=$(e2e_ctr snapshots --snapshotter stargz ls 2>/dev/null | tail -n +2 | wc -l)
    [ "$left" = 0 ] || say "warning: $left stargz snapshots left after GC"
  fi
  if [ "$drop_caches" = 1 ]; then
    sync
    echo 3 >/proc/sys/vm/drop_caches
  fi
}

# ---------------------------------------------------------------------------
# Images in the registry

push_images() {
  say "pushing $TAG to $REGISTRY/bench/debian-python3:gzip"
  skopeo --insecure-policy copy --quiet --dest-tls-verify=false \
    "oci:$OCI:$TAG" "docker://$REGISTRY/bench/debian-python3:gzip" >/dev/null
  REF=$REGISTRY/bench/debian-python3:gzip
  ESGZ_REF=$REGISTRY/bench/debian-python3:esgz

  local src_digest
  src_digest=$(manifest_of "$TAG" | sha256sum | cut -d' ' -f1)
  if [ -f "$CACHE/esgz.done" ] && [ "$(cat "$CACHE/esgz.done")" = "$src_digest" ] &&
    skopeo inspect --raw "oci:$OCI:$ESGZ_TAG" >/dev/null 2>&1; then
    say "pushing the cached eStargz conversion to $ESGZ_REF"
    skopeo --insecure-policy copy --quiet --dest-tls-verify=false \
      "oci:$OCI:$ESGZ_TAG" "docker://$ESGZ_REF" >/dev/null
  else
    say "converting with ctr-remote image convert --estargz --oci (cached afterwards)"
    local start=$SECONDS
    e2e_ctr images pull --plain-http "$REF" >/dev/null
    ctr_remote image convert --estargz --oci "$REF" "$ESGZ_REF" >/dev/null
    e2e_ctr images push --plain-http "$ESGZ_REF" >/dev/null
    rm -f "$CACHE/esgz.done"
    skopeo --insecure-policy copy --quiet --src-tls-verify=false \
      "docker://$ESGZ_REF" "oci:$OCI:$ESGZ_TAG" >/dev/null
    echo "$src_digest" >"$CACHE/esgz.done"
    say "converted in $((SECONDS - start))s"
  fi
  manifest_of "$ESGZ_TAG" | jq -e '.layers[0].annotations["containerd.io/snapshot/stargz/toc.digest"]' >/dev/null ||
    die "the eStargz image has no containerd.io/snapshot/stargz/toc.digest annotation"
}

# make_profile_image: PROF_REF, Shoal's format with a startup profile recorded
# by running HELLO_CMD once (shoal optimize, on a throwaway Shoal root);
# PROF_STARTUP_BYTES: its compressed startup set.
make_profile_image() {
  PROF_REF=$REGISTRY/bench/debian-python3:shoal
  say "shoal optimize: converting, running ${HELLO_CMD[*]} once, converting with the profile"
  restart_shoal
  local out start=$SECONDS
  out=$("$repo/target/release/shoal" optimize -q --json --force --hosts-dir "$CERTS_D" \
    --address "$E2E_DIR/shoal.sock" --containerd-address "$E2E_DIR/containerd.sock" \
    --namespace "$E2E_NS" --work-dir "$E2E_DIR" "oci:$OCI:$TAG" "$PROF_REF" -- "${HELLO_CMD[@]}") ||
    die "shoal optimize failed"
  PROF_STARTUP_BYTES=$(jq '[.manifests[].layers[].startup_bytes] | add' <<<"$out")
  PROF_LAYER_BYTES=$(jq '[.manifests[].layers[].size] | add' <<<"$out")
  say "profile image in $((SECONDS - start))s: startup set $(jq '[.manifests[].layers[].startup_files] | add' <<<"$out") files, $(mb "$PROF_STARTUP_BYTES") of a $(mb "$PROF_LAYER_BYTES") layer"
  reset_caches
  e2e_stop_pid shoal
}

# image_sizes: IMAGE_BYTES (uncompressed), LAYER_BYTES (gzip), ESGZ_LAYER_BYTES.
image_sizes() {
  LAYER_BYTES=$(manifest_of "$TAG" | jq '[.layers[].size] | add')
  ESGZ_LAYER_BYTES=$(manifest_of "$ESGZ_TAG" | jq '[.layers[].size] | add')
  IMAGE_BYTES=$(manifest_of "$ESGZ_TAG" |
    jq '[.layers[].annotations["io.containerd.estargz.uncompressed-size"] // "0" | tonumber] | add')
  if [ "$IMAGE_BYTES" = 0 ]; then
    IMAGE_BYTES=$(du -sb --apparent-size "$ROOTFS" | cut -f1)
  fi
}

mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }

# ---------------------------------------------------------------------------
# One measurement

# registry_log_lines: lines in the registry's log so far.
registry_log_lines() { wc -l <"$E2E_DIR/logs/registry.log"; }

# http_bytes FROM TO: response body bytes in the registry's access log lines
# FROM+1..TO (combined log format: "GET /v2/... HTTP/1.1" 200 BYTES ...).
http_bytes() {
  sed -n "$(($1 + 1)),$2p" "$E2E_DIR/logs/registry.log" |
    awk 'match($0, /" [0-9][0-9][0-9] [0-9]+ "/) { split(substr($0, RSTART + 2, RLENGTH - 3), f, " "); n += f[2] }
         END { printf "%d", n }'
}

# http_requests FROM TO: requests (GET and HEAD, manifests and blobs) in the
# registry's access log lines FROM+1..TO.
http_requests() {
  sed -n "$(($1 + 1)),$2p" "$E2E_DIR/logs/registry.log" | grep -c '"\(GET\|HEAD\) /v2/' || true
}

# run_hello NAME REF MARKS: ctr run --rm the hello command; the first "hello"
# line is stamped into MARKS as "EPOCHREALTIME TX_BYTES LOG_LINES".
run_hello() {
  local name=$1 ref=$2 marks=$3 run_args=()
  [ "$name" = overlayfs ] || run_args=(--snapshotter "${name%-profile}")
  : >"$marks"
  if ! e2e_ctr run --rm "${run_args[@]}" "$ref" "bench-$name-$RANDOM" "${HELLO_CMD[@]}" 2>>"$E2E_DIR/logs/$name-run.log" |
    while IFS= read -r line; do
      if [ "$line" = hello ] && [ ! -s "$marks" ]; then
        printf '%s %s %s\n' "$EPOCHREALTIME" "$(registry_tx)" "$(registry_log_lines)" >"$marks"
      fi
      printf '%s\n' "$line" >>"$E2E_DIR/logs/$name-run.log"
    done; then
    tail -n 20 "$E2E_DIR/logs/$name-run.log" >&2
    say "$name: ctr run failed"
    return 1
  fi
  [ -s "$marks" ] || { tail -n 20 "$E2E_DIR/logs/$name-run.log" >&2; say "$name: the container never printed hello"; return 1; }
}

# wait_link_idle: until the registry sends under 64 KB in half a second (up to
# 10 s), so that no leftover transfer shares the link with a measurement.
wait_link_idle() {
  local a b i
  for i in $(seq 1 20); do
    a=$(registry_tx)
    sleep 0.5
    b=$(registry_tx)
    [ $((b - a)) -ge 65536 ] || return 0
  done
  say "warning: the registry is still sending ($(mb $((b - a))) in the last 0.5 s); measuring anyway"
}

# measure NAME PULL-CMD... : runs PULL-CMD REF, then the container; sets
# T_HELLO (seconds from pull start to "hello"), T_PULL, BYTES_HELLO (wire
# bytes the registry's veth sent by then, headers included), HTTP_HELLO
# (response bytes in the registry's access log by then), BYTES_END (wire
# bytes by the container's exit) and T_WARM (a second run of the same,
# now local, image: start to "hello", the container start cost alone).
measure() {
  local name=$1
  shift
  local ref=$ESGZ_REF
  case $name in overlayfs) ref=$REF ;; shoal-profile) ref=$PROF_REF ;; esac
  local marks=$E2E_DIR/$name.marks
  local tx0 log0 t0 t1
  wait_link_idle
  tx0=$(registry_tx)
  log0=$(registry_log_lines)
  t0=$EPOCHREALTIME
  if ! "$@" "$ref" >"$E2E_DIR/logs/$name-pull.log" 2>&1; then
    tail -n 20 "$E2E_DIR/logs/$name-pull.log" >&2
    say "$name: pull failed"
    return 1
  fi
  t1=$EPOCHREALTIME
  run_hello "$name" "$ref" "$marks" || return 1
  local t_hello tx_hello log_hello
  read -r t_hello tx_hello log_hello <"$marks"
  T_PULL=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  T_HELLO=$(awk -v a="$t0" -v b="$t_hello" 'BEGIN { printf "%.2f", b - a }')
  BYTES_HELLO=$((tx_hello - tx0))
  HTTP_HELLO=$(http_bytes "$log0" "$log_hello")
  REQS_HELLO=$(http_requests "$log0" "$log_hello")
  BYTES_END=$(($(registry_tx) - tx0))
  say "$name: hello after ${T_HELLO}s (pull ${T_PULL}s); registry sent $(mb "$BYTES_HELLO") on the wire ($(mb "$HTTP_HELLO") of HTTP bodies, $REQS_HELLO requests) by then, $(mb "$BYTES_END") by container exit"
  # ctr's pull prints "elapsed: 10.6s" (the download) and then "done: 24.2s"
  # (the unpack alone).
  local dl up
  dl=$(tr '\r' '\n' <"$E2E_DIR/logs/$name-pull.log" | sed -n 's/^elapsed: \([0-9.]*\)s.*/\1/p' | tail -n 1)
  up=$(tr '\r' '\n' <"$E2E_DIR/logs/$name-pull.log" | sed -n 's/^done: \([0-9.hm]*s\).*/\1/p' | tail -n 1)
  [[ $up =~ ^[0-9.]+s$ ]] && up=$(awk -v u="${up%s}" 'BEGIN { printf "%.2fs", u }')
  if [ -n "$dl$up" ]; then
    say "$name: ctr reports download ${dl:-?}s, unpack ${up:-?}"
  fi
  local t2
  t2=$EPOCHREALTIME
  run_hello "$name" "$ref" "$marks" || return 1
  read -r t_hello _ _ <"$marks"
  T_WARM=$(awk -v a="$t2" -v b="$t_hello" 'BEGIN { printf "%.2f", b - a }')
  say "$name: warm run (image now local): hello after ${T_WARM}s"
}

median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# ---------------------------------------------------------------------------
# Main

need_tools
if [ "$build" = 1 ] && { wants shoal || wants shoal-profile; }; then
  say "cargo build --release --bins"
  (cd "$repo" && PATH="$HOME/.cargo/bin:$PATH" cargo build --release --bins) || die "cargo build failed"
fi
if wants shoal || wants shoal-profile; then
  [ -x "$E2E_SHOAL_BIN" ] || die "shoal-snapshotter not found at $E2E_SHOAL_BIN (run: cargo build --release --bins)"
else
  E2E_SHOAL_BIN=
fi
[ "$stargz" = 0 ] || build_stargz

build_rootfs
build_oci

snapshotters=()
for sn in "${want[@]}"; do
  [ "$sn" != stargz ] || [ "$stargz" = 1 ] || continue
  snapshotters+=("$sn")
done
[ ${#snapshotters[@]} -gt 0 ] || die "nothing to measure"

E2E_DIR=$(mktemp -d "${TMPDIR:-/tmp}/shoal-bench.XXXXXX")
E2E_NS=${E2E_NS:-shoal-bench-$(basename "$E2E_DIR" | cut -d. -f2 | tr 'A-Z' 'a-z')}
export E2E_DIR E2E_NS
mkdir -p "$E2E_DIR/logs"
trap 'bench_cleanup "$?"; exit "$?"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
say "world in $E2E_DIR (containerd namespace $E2E_NS); measuring ${snapshotters[*]}"
say "load average now: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs (unpacking is CPU-bound; a busy machine slows overlayfs)"

net_setup
start_registry
write_hosts_config
# containerd's proxy plugins dial their sockets lazily; each remote
# snapshotter starts (fresh) before each of its measurements.
start_containerd
push_images
wants shoal-profile && make_profile_image
image_sizes
say "image: $(mb "$IMAGE_BYTES") uncompressed; gzip layer $(mb "$LAYER_BYTES"); eStargz layer $(mb "$ESGZ_LAYER_BYTES")"
reset_caches
net_shape

declare -A times=() bytes=() http=() reqs=() warm=() med=()
for i in $(seq 1 "$runs"); do
  for sn in "${snapshotters[@]}"; do
    reset_caches
    [ "$runs" = 1 ] || say "run $i/$runs: $sn"
    case $sn in
      overlayfs)
        measure overlayfs e2e_ctr images pull --plain-http || die "overlayfs measurement failed"
        ;;
      shoal)
        restart_shoal
        if ! measure shoal ctr_remote image rpull --plain-http --hosts-dir "$CERTS_D" --snapshotter shoal; then
          e2e_tail_log shoal 40
          die "shoal measurement failed (logs in $E2E_DIR/logs; rerun with --keep to keep them)"
        fi
        if [ -x "$repo/target/release/shoal" ]; then
          "$repo/target/release/shoal" status --address "$E2E_DIR/shoal.sock" 2>&1 | sed 's/^/  shoal status: /' >&2 || true
        fi
        # Its background fetch must not eat the next measurement's link.
        reset_caches
        e2e_stop_pid shoal
        ;;
      shoal-profile)
        restart_shoal
        if ! measure shoal-profile ctr_remote image rpull --plain-http --hosts-dir "$CERTS_D" --snapshotter shoal; then
          e2e_tail_log shoal 40
          die "shoal-profile measurement failed (logs in $E2E_DIR/logs; rerun with --keep to keep them)"
        fi
        "$repo/target/release/shoal" status --address "$E2E_DIR/shoal.sock" 2>&1 | sed 's/^/  shoal status: /' >&2 || true
        reset_caches
        e2e_stop_pid shoal
        ;;
      stargz)
        restart_stargz
        if ! measure stargz ctr_remote image rpull --plain-http --hosts-dir "$CERTS_D" --snapshotter stargz; then
          e2e_tail_log stargz 40
          die "stargz measurement failed (logs in $E2E_DIR/logs; rerun with --keep to keep them)"
        fi
        reset_caches
        e2e_stop_pid stargz
        ;;
    esac
    times[$sn]+=" $T_HELLO"
    bytes[$sn]+=" $BYTES_HELLO"
    http[$sn]+=" $HTTP_HELLO"
    reqs[$sn]+=" $REQS_HELLO"
    warm[$sn]+=" $T_WARM"
  done
done
reset_caches

# shellcheck disable=SC2086
for sn in "${snapshotters[@]}"; do
  med[$sn]=$(median ${times[$sn]})
  med[${sn}_bytes]=$(median ${bytes[$sn]} | awk '{ printf "%d", $1 }')
  med[${sn}_http]=$(median ${http[$sn]} | awk '{ printf "%d", $1 }')
  med[${sn}_reqs]=$(median ${reqs[$sn]} | awk '{ printf "%d", $1 }')
  med[${sn}_warm]=$(median ${warm[$sn]})
done
has() { [ -n "${med[$1]:-}" ]; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }

line="bench: rate=$rate latency_ms=$latency_ms"
has overlayfs && line+=" overlayfs=${med[overlayfs]}s"
has shoal && line+=" shoal=${med[shoal]}s"
has overlayfs && has shoal && line+=" ratio=$(div "${med[shoal]}" "${med[overlayfs]}")"
has overlayfs && line+=" overlayfs_bytes=${med[overlayfs_bytes]}"
has shoal && line+=" shoal_bytes=${med[shoal_bytes]}"
if has stargz; then
  line+=" stargz=${med[stargz]}s"
  has overlayfs && line+=" stargz_ratio=$(div "${med[stargz]}" "${med[overlayfs]}")"
  line+=" stargz_bytes=${med[stargz_bytes]}"
fi
for sn in "${snapshotters[@]}"; do line+=" ${sn//-/_}_http_bytes=${med[${sn}_http]}"; done
for sn in "${snapshotters[@]}"; do line+=" ${sn//-/_}_requests=${med[${sn}_reqs]}"; done
for sn in "${snapshotters[@]}"; do line+=" ${sn//-/_}_warm=${med[${sn}_warm]}s"; done
has shoal && line+=" shoal_background_fetch=$shoal_bg"
line+=" workload=$workload image_bytes=$IMAGE_BYTES layer_bytes=$LAYER_BYTES esgz_layer_bytes=$ESGZ_LAYER_BYTES runs=$runs"

echo
printf 'Debian %s + python3: %s uncompressed, one gzip layer of %s (eStargz: %s)\n' \
  "$SUITE" "$(mb "$IMAGE_BYTES")" "$(mb "$LAYER_BYTES")" "$(mb "$ESGZ_LAYER_BYTES")"
link="tbf $rate"
[ "$latency_ms" = 0 ] || link+=" + ${latency_ms} ms per round trip (delay proxy)"
printf 'workload %s; link: %s; timed from pull start to the first "hello"; median of %s run(s)\n' "$workload" "$link" "$runs"
for sn in "${snapshotters[@]}"; do
  printf '  %-14s %7ss   registry sent %s on the wire, %s of HTTP bodies in %s requests   warm run %ss   (runs:%s)\n' \
    "$sn" "${med[$sn]}" "$(mb "${med[${sn}_bytes]}")" "$(mb "${med[${sn}_http]}")" "${med[${sn}_reqs]}" "${med[${sn}_warm]}" "${times[$sn]}"
done
if has overlayfs; then
  has shoal && printf '  shoal/overlayfs = %s\n' "$(div "${med[shoal]}" "${med[overlayfs]}")"
  has stargz && printf '  stargz/overlayfs = %s\n' "$(div "${med[stargz]}" "${med[overlayfs]}")"
fi
has shoal && has stargz && printf '  shoal/stargz = %s\n' "$(div "${med[shoal]}" "${med[stargz]}")"
if has shoal-profile; then
  has overlayfs && printf '  shoal-profile/overlayfs = %s\n' "$(div "${med[shoal-profile]}" "${med[overlayfs]}")"
  has shoal && printf '  shoal-profile/shoal = %s\n' "$(div "${med[shoal-profile]}" "${med[shoal]}")"
  # Transfer floor: the startup set over the link, plus the container start
  # overlayfs shows with the image local.
  if has overlayfs; then
    floor=$(awk -v b="$PROF_STARTUP_BYTES" -v r="$(rate_bits "$rate")" -v w="${med[overlayfs_warm]}" 'BEGIN { printf "%.2f", b * 8 / r + w }')
    printf '  transfer floor %ss (startup set %s at %s + overlayfs warm start %ss); shoal-profile/floor = %s\n' \
      "$floor" "$(mb "$PROF_STARTUP_BYTES")" "$rate" "${med[overlayfs_warm]}" "$(div "${med[shoal-profile]}" "$floor")"
    line+=" floor=${floor}s"
  fi
  line+=" shoal_profile=${med[shoal-profile]}s shoal_profile_bytes=${med[shoal-profile_bytes]} startup_bytes=$PROF_STARTUP_BYTES"
fi
echo "$line"

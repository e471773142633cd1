#!/usr/bin/env bash
# P2P over mTLS between two real shoal-snapshotter processes, each in its own
# network namespace on a bridge with veth links:
#   - node A holds a chunk (seeded in its chunk store) and serves it on its
#     P2P port; node B (P2P on, its one static peer unreachable) still starts
#     and answers on its socket;
#   - from B's namespace, `shoal cluster get-chunk` with B's certificate gets
#     the chunk from A, verified against the digest it asked for;
#   - the same request with a certificate from another CA, and one naming a
#     digest A does not hold, get nothing.
# Needs root (netns, veth, bridge). Usage: tests/e2e/p2p.sh [--no-build]
# Cleans up only what it made: its pids, namespaces, bridge and temp dir.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ "${1:-}" = "--no-build" ] || cargo build --release -p shoal-snapshotter --manifest-path "$REPO/Cargo.toml"
BIN=$REPO/target/release
[ "$(id -u)" = 0 ] || { echo "p2p.sh: needs root (network namespaces)" >&2; exit 1; }

TAG=$$
DIR=$(mktemp -d "${TMPDIR:-/tmp}/shoal-p2p.XXXXXX")
BR=shp2p$TAG
NET=10.231.$((TAG % 250)).
PIDS=()
NSES=()

cleanup() {
  local pid ns
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  for ns in "${NSES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  ip link del "$BR" 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
die() { echo "p2p.sh: FAIL: $*" >&2; for f in "$DIR"/*.log; do echo "--- $f" >&2; tail -n 20 "$f" >&2; done; exit 1; }

ip link add "$BR" type bridge
ip link set "$BR" up
# node NAME INDEX: a namespace with eth0 = ${NET}INDEX/24 on the bridge.
node_net() {
  local ns=shoal-p2p-$TAG-$1
  ip netns add "$ns"; NSES+=("$ns")
  ip link add "h$1$TAG" type veth peer name "n$1$TAG"
  ip link set "n$1$TAG" netns "$ns"
  ip link set "h$1$TAG" master "$BR" up
  ip -n "$ns" link set lo up
  ip -n "$ns" link set "n$1$TAG" name eth0
  ip -n "$ns" addr add "${NET}$2/24" dev eth0
  ip -n "$ns" link set eth0 up
}
node_net a 1
node_net b 2
NS_A=shoal-p2p-$TAG-a NS_B=shoal-p2p-$TAG-b

"$BIN/shoal" cluster init-ca --dir "$DIR/ca" >/dev/null
"$BIN/shoal" cluster issue-node --ca "$DIR/ca" --name node-a --out "$DIR/a/tls" >/dev/null
"$BIN/shoal" cluster issue-node --ca "$DIR/ca" --name node-b --out "$DIR/b/tls" >/dev/null
"$BIN/shoal" cluster init-ca --dir "$DIR/other-ca" >/dev/null
"$BIN/shoal" cluster issue-node --ca "$DIR/other-ca" --name mallory --out "$DIR/mallory" >/dev/null
# Mallory trusts our CA for the server (it could copy ca.pem) but its own
# certificate is not ours.
cp "$DIR/ca/ca.pem" "$DIR/mallory/ca.pem"
[ "$(stat -c %a "$DIR/a/tls/node.key")" = 600 ] || die "node key is not 0600"

# A 300 KiB chunk in A's store, under its sha256 (a headerless chunk file is
# checked by its sha256 when read).
head -c $((300 << 10)) /dev/urandom >"$DIR/chunk"
HEX=$(sha256sum "$DIR/chunk" | cut -d' ' -f1)
mkdir -p "$DIR/a/root/chunks/${HEX:0:2}"
cp "$DIR/chunk" "$DIR/a/root/chunks/${HEX:0:2}/$HEX"

# start NAME NS CONFIG
start() {
  printf '%s\n' "$3" >"$DIR/$1/config.toml"
  ip netns exec "$2" "$BIN/shoal-snapshotter" --root "$DIR/$1/root" \
    --address "$DIR/$1/shoal.sock" --config "$DIR/$1/config.toml" \
    >"$DIR/$1.log" 2>&1 &
  PIDS+=($!)
}
start a "$NS_A" "version = 1
[p2p]
enabled = true
listen = \"${NET}1:7701\"
tls_dir = \"$DIR/a/tls\""
start b "$NS_B" "version = 1
[p2p]
enabled = true
listen = \"${NET}2:7701\"
peers = [\"${NET}99:7701\"]
tls_dir = \"$DIR/b/tls\""

for _ in $(seq 100); do
  [ -S "$DIR/a/shoal.sock" ] && [ -S "$DIR/b/shoal.sock" ] \
    && ip netns exec "$NS_B" bash -c "exec 3<>/dev/tcp/${NET}2/7701" 2>/dev/null \
    && ip netns exec "$NS_A" bash -c "exec 3<>/dev/tcp/${NET}1/7701" 2>/dev/null && break
  sleep 0.2
done
for i in 0 1; do kill -0 "${PIDS[$i]}" || die "a daemon exited"; done
"$BIN/shoal" status --address "$DIR/b/shoal.sock" >/dev/null \
  || die "node B (P2P on, no reachable peer) does not answer on its socket"
echo "ok: both daemons up; B answers with its only peer unreachable"

get() { # TLS_DIR DIGEST OUT
  ip netns exec "$NS_B" "$BIN/shoal" cluster get-chunk --tls-dir "$1" \
    --peer "${NET}1:7701" --digest "$2" --length $((300 << 10)) --out "$3" --timeout-ms 5000
}
get "$DIR/b/tls" "$HEX" "$DIR/got" >"$DIR/get.out" 2>&1 || die "B could not fetch from A: $(cat "$DIR/get.out")"
cmp -s "$DIR/chunk" "$DIR/got" || die "B got different bytes"
echo "ok: B fetched the chunk from A over mTLS ($(cat "$DIR/get.out"))"

if get "$DIR/mallory" "$HEX" "$DIR/stolen" >"$DIR/mallory.out" 2>&1; then
  die "a client certificate from another CA was served"
fi
[ ! -s "$DIR/stolen" ] || die "bytes were written for an uncertified client"
echo "ok: a client with a certificate from another CA got nothing: $(tail -n1 "$DIR/mallory.out")"

if get "$DIR/b/tls" "$(printf '%064d' 0)" "$DIR/none" >"$DIR/none.out" 2>&1; then
  die "a chunk A does not hold was served"
fi
grep -q "does not hold" "$DIR/none.out" || die "expected not-found: $(cat "$DIR/none.out")"
echo "ok: a chunk A does not hold is reported as not held"
echo "PASS: tests/e2e/p2p.sh"

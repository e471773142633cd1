#!/usr/bin/env bash
# What the layer identity check costs (issue 12 §1): the same lazy pull with
# `[remote] verify_layers` on and off, side by side in one run. Needs root.
#
#   tests/bench/identity.sh [--no-build] [--runs N]     (make bench-identity)
#
# Image: busybox plus a 32 MiB random file (eStargz, converted by ctr-remote),
# on loopback. Each run starts a fresh daemon root and containerd namespace,
# pulls the image lazily with `ctr-remote image rpull`, runs `echo hello`,
# and waits until the layer is fully local (background fetch, delay 0) and,
# with the check on, verified. Prints per configuration the medians over N
# runs (default 3) of:
#   - compressed bytes fetched from the registry until fully local, as a
#     multiple of the layers' blob bytes;
#   - seconds from pull start to the first output;
#   - seconds from pull start to fully local (and verified);
# and the ratios on/off.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/e2e/lib.sh
source "$repo/tests/e2e/lib.sh"

runs=3 build=1
while [ $# -gt 0 ]; do
  case $1 in
    --no-build) build=0 ;;
    --runs) runs=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo pipefail$/{/^set -euo pipefail$/!p}' "$0"; exit 0 ;;
    *) echo "identity.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$build" = 0 ] || (cd "$repo" && cargo build --release --bins)
command -v ctr-remote >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stargz-snapshotter >/dev/null

e2e_world_start
cli="$repo/target/release/shoal"
images="$E2E_DIR/images"
"$repo/tests/e2e/images.sh" "$images" "$E2E_REGISTRY" busybox big >/dev/null 2>&1
src=$(cat "$images/big.ref")
e2e_ctr image pull -q --plain-http "$src" >/dev/null
ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" image convert --estargz --oci "$src" "$src-esgz" >/dev/null
e2e_ctr image push --plain-http "$src-esgz" >/dev/null 2>&1
ref="$src-esgz"
repo_tag=${ref#*/}
blob_bytes=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
  "http://$E2E_REGISTRY/v2/${repo_tag%:*}/manifests/${repo_tag##*:}" | jq '[.layers[].size] | add')


one_run() { # VERIFY RUN -> "bytes first_s local_s"
  local verify=$1 n=$2 ns="bench-$1-$2" t0 t1 t2 js i
  e2e_stop_pid shoal
  printf 'version = 1\n[remote]\nbackground_delay_secs = 0\nverify_layers = %s\n' "$verify" >"$E2E_DIR/bench.toml"
  e2e_start shoal "$E2E_SHOAL_BIN" --root "$E2E_DIR/root-$verify-$n" --address "$E2E_DIR/shoal.sock" \
    --config "$E2E_DIR/bench.toml" --log-level info
  e2e_wait_for shoal "its socket" e2e_sock_ready "$E2E_DIR/shoal.sock"
  for i in $(seq 1 50); do e2e_ctr snapshots --snapshotter shoal ls >/dev/null 2>&1 && break; sleep 0.2; done
  t0=$(date +%s.%N)
  ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$ns" image rpull --plain-http --snapshotter shoal "$ref" >/dev/null
  ctr --address "$E2E_DIR/containerd.sock" --namespace "$ns" run --rm --snapshotter shoal "$ref" "b-$verify-$n" echo hello >/dev/null
  t1=$(date +%s.%N)
  for i in $(seq 1 600); do
    js=$("$cli" status --address "$E2E_DIR/shoal.sock" --json)
    if jq -e --arg v "$verify" '[.layers[] | select(.bytes_local == .bytes_total and ($v == "false" or .identity == "verified"))] | length == (.layers | length) and length > 0' <<<"$js" >/dev/null; then
      break
    fi
    sleep 0.1
  done
  t2=$(date +%s.%N)
  echo "$(jq '.counters.bytes_fetched' <<<"$js") $(echo "$t1 - $t0" | bc) $(echo "$t2 - $t0" | bc)"
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

declare -A res
for n in $(seq 1 "$runs"); do
  for v in false true; do
    res[$v-$n]=$(one_run "$v" "$n")
    echo "run $n verify_layers=$v: bytes first_s local_s = ${res[$v-$n]}" >&2
  done
done
printf '\nidentity check cost: %s, blob bytes %d, %d runs (medians)\n' "$ref" "$blob_bytes" "$runs"
printf '%-22s %14s %10s %12s %12s\n' config bytes_fetched x_blob first_out_s local_s
for v in false true; do
  b=$(for n in $(seq 1 "$runs"); do echo "${res[$v-$n]}" | cut -d' ' -f1; done | median)
  f=$(for n in $(seq 1 "$runs"); do echo "${res[$v-$n]}" | cut -d' ' -f2; done | median)
  l=$(for n in $(seq 1 "$runs"); do echo "${res[$v-$n]}" | cut -d' ' -f3; done | median)
  declare "b_$v=$b" "f_$v=$f" "l_$v=$l"
  printf '%-22s %14.0f %10.3f %12.2f %12.2f\n' "verify_layers=$v" "$b" "$(echo "$b / $blob_bytes" | bc -l)" "$f" "$l"
done
printf 'ratio on/off: bytes %.3f  first output %.2f  fully local %.2f\n' \
  "$(echo "$b_true / $b_false" | bc -l)" "$(echo "$f_true / $f_false" | bc -l)" "$(echo "$l_true / $l_false" | bc -l)"

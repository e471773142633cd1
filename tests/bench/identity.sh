#!/usr/bin/env bash
# What the layer identity check costs (issue 12 §1): the same lazy pull with
# `[remote] verify_layers` on and off, side by side in one run. Needs root.
#
#   tests/bench/identity.sh [--no-build] [--runs N]     (make bench-identity)
#
# Two daemons side by side under one containerd: snapshotter `shoal` with the
# check on, `shoalnv` with it off (both background_delay_secs = 0). Each run
# builds a fresh image (busybox plus a new 32 MiB random file, eStargz by
# ctr-remote, on loopback), so neither store has its chunks, then for each
# daemon in turn: pulls it lazily with `ctr-remote image rpull`, runs
# `echo hello`, and waits until the layer is fully local and, with the check
# on, verified. Prints per configuration the medians over N
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

nv_sock="$E2E_DIR/shoalnv.sock"
E2E_SHOAL_CONFIG_TEXT='version = 1
[remote]
background_delay_secs = 0
verify_layers = true'
E2E_EXTRA_PROXY_PLUGINS="[proxy_plugins.shoalnv]
  type = \"snapshot\"
  address = \"$nv_sock\""
e2e_world_start
printf 'version = 1\n[remote]\nbackground_delay_secs = 0\nverify_layers = false\n' >"$E2E_DIR/nv.toml"
e2e_start shoalnv "$E2E_SHOAL_BIN" --root "$E2E_DIR/shoalnv" --address "$nv_sock" --config "$E2E_DIR/nv.toml" --log-level info
e2e_wait_for shoalnv "its socket" e2e_sock_ready "$nv_sock"
cli="$repo/target/release/shoal"
images="$E2E_DIR/images"
"$repo/tests/e2e/images.sh" "$images" "$E2E_REGISTRY" busybox >/dev/null 2>&1

# new_image N: busybox + a fresh 32 MiB random file, eStargz; prints the ref.
new_image() {
  local b="$E2E_DIR/bundle-$1" src="$E2E_REGISTRY/big$1:1"
  rm -rf "$b"
  umoci unpack --image "$images/oci:busybox-1" "$b" >/dev/null
  head -c $((32 << 20)) /dev/urandom >"$b/rootfs/unused.bin"
  umoci repack --refresh-bundle --image "$images/oci:big$1" "$b" >/dev/null
  skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$images/oci:big$1" "docker://$src" >/dev/null
  e2e_ctr image pull -q --plain-http "$src" >/dev/null
  ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" image convert --estargz --oci "$src" "$src-esgz" >/dev/null
  e2e_ctr image push --plain-http "$src-esgz" >/dev/null 2>&1
  echo "$src-esgz"
}

blob_bytes_of() {
  local rt=${1#*/}
  curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$E2E_REGISTRY/v2/${rt%:*}/manifests/${rt##*:}" | jq '[.layers[].size] | add'
}

# one_run SNAPSHOTTER SOCK VERIFY REF N: appends "bytes first_s local_s" to $E2E_DIR/res-VERIFY
one_run() {
  local sn=$1 sock=$2 verify=$3 ref=$4 n=$5 ns="bench-$3-$5" t0 t1 t2 js i b0
  b0=$("$cli" status --address "$sock" --json | jq '.counters.bytes_fetched')
  t0=$(date +%s.%N)
  ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$ns" image rpull --plain-http --snapshotter "$sn" "$ref" >/dev/null
  ctr --address "$E2E_DIR/containerd.sock" --namespace "$ns" run --rm --snapshotter "$sn" "$ref" "b-$verify-$n" echo hello >/dev/null
  t1=$(date +%s.%N)
  for i in $(seq 1 1200); do
    js=$("$cli" status --address "$sock" --json)
    if jq -e --arg v "$verify" --arg img "$ref" '[.layers[] | select(.image_ref == $img)] as $l | ($l | length) > 0 and ([$l[] | select(.bytes_local == .bytes_total and ($v == "false" or .identity == "verified"))] | length) == ($l | length)' <<<"$js" >/dev/null; then
      break
    fi
    sleep 0.1
  done
  t2=$(date +%s.%N)
  echo "$(( $(jq '.counters.bytes_fetched' <<<"$js") - b0 )) $(echo "$t1 - $t0" | bc) $(echo "$t2 - $t0" | bc)" >>"$E2E_DIR/res-$verify"
  echo "run $n verify_layers=$verify: bytes first_s local_s = $(tail -n 1 "$E2E_DIR/res-$verify")" >&2
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

blob_total=0
for n in $(seq 1 "$runs"); do
  ref=$(new_image "$n")
  blob_total=$(blob_bytes_of "$ref")
  # Alternate which daemon goes first.
  if [ $((n % 2)) = 1 ]; then
    one_run shoalnv "$nv_sock" false "$ref" "$n"; one_run shoal "$E2E_DIR/shoal.sock" true "$ref" "$n"
  else
    one_run shoal "$E2E_DIR/shoal.sock" true "$ref" "$n"; one_run shoalnv "$nv_sock" false "$ref" "$n"
  fi
done
printf '\nidentity check cost: busybox + 32 MiB random (eStargz, %d blob bytes), loopback, %d runs (medians)\n' "$blob_total" "$runs"
printf '%-22s %14s %10s %12s %12s\n' config bytes_fetched x_blob first_out_s local_s
for v in false true; do
  b=$(cut -d' ' -f1 "$E2E_DIR/res-$v" | median)
  f=$(cut -d' ' -f2 "$E2E_DIR/res-$v" | median)
  l=$(cut -d' ' -f3 "$E2E_DIR/res-$v" | median)
  declare "b_$v=$b" "f_$v=$f" "l_$v=$l"
  printf '%-22s %14.0f %10.3f %12.2f %12.2f\n' "verify_layers=$v" "$b" "$(echo "$b / $blob_total" | bc -l)" "$f" "$l"
done
printf 'ratio on/off: bytes %.3f  first output %.2f  fully local %.2f\n' \
  "$(echo "$b_true / $b_false" | bc -l)" "$(echo "$f_true / $f_false" | bc -l)" "$(echo "$l_true / $l_false" | bc -l)"

#!/usr/bin/env bash
# End-to-end test of lazy pulling with real parts: images converted by an
# external tool (Debian's ctr-remote: eStargz and zstd:chunked), pulled through
# Shoal by `ctr-remote image rpull` and by plain `ctr image pull`, run with
# `ctr run`, and compared with containerd's own overlayfs. Needs root.
# Prints PASS/FAIL lines and ends with `lazy: N passed, M failed`.
#
#   tests/e2e/lazy.sh [--no-build]
#
# Checks:
#   - rpull mounts every layer through FUSE (shoal:sha256:… in /proc/mounts)
#     and containerd never downloads the layer blobs (not in its content store);
#   - the program's output, and the tree the container sees, equal overlayfs's
#     (full pull of the same converted image) and umoci's unpack of the source;
#   - only a small fraction of the layer bytes was fetched before the program
#     printed (image with a 24 MiB file the program never reads; background
#     fetch off);
#   - plain `ctr image pull --snapshotter shoal` (no lazy labels) still works;
#   - a daemon restart remounts the layers from local state; cached data is
#     not fetched again.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/e2e/lib.sh
source "$here/lib.sh"
e2e_simple_args "$@"

e2e_checks_begin lazy

[ "$build" = 0 ] || e2e_build
command -v ctr-remote >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stargz-snapshotter >/dev/null
}

E2E_EXIT_HOOK=summary
e2e_world_start
cli="$repo/target/release/shoal"
ctr_remote() { timeout 300 ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" "$@"; }
status_json() { "$cli" status --address "$E2E_DIR/shoal.sock" --json; }

# Restart shoal-snapshotter with a config (background fetch off, so what was
# fetched is what was read).
config="$E2E_DIR/shoal-config.toml"
cat >"$config" <<TOML
version = 1
[remote]
background_fetch = false
# These checks count what reads fetched: no whole-blob identity pass.
verify_layers = false
TOML
restart_shoal() {
  e2e_stop_pid shoal
  e2e_start shoal "$E2E_SHOAL_BIN" --root "$E2E_DIR/shoal" --address "$E2E_DIR/shoal.sock" \
    --config "$config" --log-level "info,shoal=debug"
  e2e_wait_for shoal "its socket" e2e_sock_ready "$E2E_DIR/shoal.sock"
  # containerd's proxy client reconnects by itself.
  local i
  for i in $(seq 1 50); do
    e2e_ctr snapshots --snapshotter shoal ls >/dev/null 2>&1 && return 0
    sleep 0.2
  done
}
restart_shoal

images="$E2E_DIR/images"
"$here/images.sh" "$images" "$E2E_REGISTRY" >/dev/null 2>&1 || { fail "images: build"; exit 1; }

# big:1: busybox plus a 24 MiB file the test program never reads.
big_bundle="$E2E_DIR/big-bundle"
umoci unpack --image "$images/oci:busybox-1" "$big_bundle" >/dev/null
head -c $((24 << 20)) /dev/urandom >"$big_bundle/rootfs/unused.bin"
umoci repack --refresh-bundle --image "$images/oci:big" "$big_bundle" >/dev/null
skopeo copy -q oci:"$images/oci:big" "docker://$E2E_REGISTRY/big:1" --dest-tls-verify=false
echo "$E2E_REGISTRY/big:1" >"$images/big.ref"
echo 'echo hello-from-big' >"$images/big.cmd"
echo hello-from-big >"$images/big.out"
pass "images: busybox:1, layered:1, big:1 built and pushed"

# Convert with the external tool and push.
for name in busybox layered big; do
  src=$(cat "$images/$name.ref")
  e2e_ctr image pull -q --plain-http "$src" >/dev/null
  for fmt in esgz zstd; do
    flag=--estargz; [ $fmt = zstd ] && flag=--zstdchunked
    if out=$(ctr_remote image convert $flag --oci "$src" "$src-$fmt" 2>&1) &&
      out=$(e2e_ctr image push --plain-http "$src-$fmt" 2>&1); then
      :
    else
      fail "convert $name to $fmt" "$(tail -n 5 <<<"$out")"
    fi
  done
done
pass "convert: ctr-remote image convert --estargz/--zstdchunked --oci, pushed"
# Start from an empty content store, so nothing is there unless pulled.
e2e_ctr image ls -q | xargs -r -n 20 "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" image rm >/dev/null
e2e_ctr content ls -q | xargs -r -n 20 "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" content rm >/dev/null 2>&1 || true

layers_of() { # REF -> layer digests, from the registry manifest
  local ref=$1 repo tag
  repo=${ref#*/}; tag=${repo##*:}; repo=${repo%:*}
  curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$E2E_REGISTRY/v2/$repo/manifests/$tag" | jq -r '.layers[].digest'
}

layer_bytes() { # REF -> sum of compressed layer sizes
  local ref=$1 repo tag
  repo=${ref#*/}; tag=${repo##*:}; repo=${repo%:*}
  curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$E2E_REGISTRY/v2/$repo/manifests/$tag" | jq '[.layers[].size] | add'
}

run_id=0
crun() {
  local ref=$1; shift
  run_id=$((run_id + 1))
  E2E_CTR_TIMEOUT=120 e2e_ctr run --rm --snapshotter shoal "$ref" "lazy-$run_id" "$@"
}

for name in busybox layered big; do
  for fmt in esgz zstd; do
    ref="$(cat "$images/$name.ref")-$fmt"
    content_before=$(e2e_ctr content ls -q)
    fetched_before=$(status_json | jq '.counters.bytes_fetched')
    t0=$(date +%s.%N)
    if ! out=$(ctr_remote image rpull --plain-http --snapshotter shoal "$ref" 2>&1); then
      fail "$name/$fmt: rpull" "$(tail -n 5 <<<"$out")"; continue
    fi
    mapfile -t layers < <(layers_of "$ref")
    missing=() downloaded=()
    for l in "${layers[@]}"; do
      grep -qF "shoal:$l " /proc/mounts || missing+=("$l")
      # Layers shared with an image pulled earlier may already be there.
      if e2e_ctr content ls -q | grep -qx "$l" && ! grep -qx "$l" <<<"$content_before"; then
        downloaded+=("$l")
      fi
    done
    if [ ${#missing[@]} -eq 0 ] && [ ${#downloaded[@]} -eq 0 ]; then
      pass "$name/$fmt: rpull mounted all ${#layers[@]} layers lazily; no layer blob downloaded"
    else
      fail "$name/$fmt: lazy mount" "not FUSE-mounted: ${missing[*]:-none}; downloaded by containerd: ${downloaded[*]:-none}"
    fi
    if crun "$ref" sh -c "$(cat "$images/$name.cmd")" >"$E2E_DIR/$name-$fmt.out" 2>&1 &&
      diff -u "$images/$name.out" "$E2E_DIR/$name-$fmt.out" >"$E2E_DIR/$name-$fmt.diff"; then
      t1=$(date +%s.%N)
      pass "$name/$fmt: program output correct ($(printf '%.2f' "$(echo "$t1 - $t0" | bc)")s from pull start)"
    else
      fail "$name/$fmt: program output" "$(head -n 20 "$E2E_DIR/$name-$fmt.diff" "$E2E_DIR/$name-$fmt.out")"
    fi
    if [ "$name" = big ]; then
      # Compressed bytes Shoal fetched (TOCs included) during pull and run,
      # against the image's compressed layer bytes. The program needs
      # busybox (~1 MiB), never the 24 MiB file.
      fetched=$(($(status_json | jq '.counters.bytes_fetched') - fetched_before))
      total=$(layer_bytes "$ref")
      if [ "$total" -gt $((24 << 20)) ] && [ $((fetched * 100 / total)) -le 15 ]; then
        pass "$name/$fmt: fetched $fetched of $total layer bytes before output ($((fetched * 100 / total))% <= 15%)"
      else
        fail "$name/$fmt: fraction fetched" "fetched $fetched of $total bytes"
      fi
    fi
    tree="$E2E_DIR/tree-shoal-$name-$fmt.txt"
    e2e_tree_container shoal "$ref" "lazy-tree-$name-$fmt" >"$tree" 2>"$tree.err" || true
    e2e_ctr image pull -q --plain-http "$ref" >/dev/null 2>&1 # overlayfs, full pull
    ref_tree="$E2E_DIR/tree-overlayfs-$name-$fmt.txt"
    e2e_tree_container overlayfs "$ref" "lazy-otree-$name-$fmt" >"$ref_tree" 2>"$ref_tree.err" || true
    if [ -s "$tree" ] && d=$(diff -u "$ref_tree" "$tree"); then
      pass "$name/$fmt: tree identical to overlayfs ($(wc -l <"$tree") paths)"
    else
      fail "$name/$fmt: tree identical to overlayfs" "$(head -n 30 <<<"${d:-$(cat "$tree.err")}")"
    fi
  done
done

# Plain ctr pull through Shoal: no lazy labels, so containerd fetches and
# unpacks every layer into Shoal's overlay snapshots. Must still work.
ref="$(cat "$images/layered.ref")"
if e2e_ctr image pull --plain-http --snapshotter shoal "$ref" >"$E2E_DIR/plain.out" 2>&1 &&
  crun "$ref" sh -c "$(cat "$images/layered.cmd")" >"$E2E_DIR/plain.out" 2>&1 &&
  diff -q "$images/layered.out" "$E2E_DIR/plain.out" >/dev/null; then
  pass "plain ctr image pull --snapshotter shoal (full pull) works"
else
  fail "plain ctr image pull --snapshotter shoal" "$(tail -n 10 "$E2E_DIR/plain.out")"
fi

# Restart: layers come back from local state, cached chunks are not refetched.
before=$(status_json | jq '.layers | length')
restart_shoal
after_js=$(status_json)
after=$(jq '.layers | length' <<<"$after_js")
ref="$(cat "$images/big.ref")-esgz"
if [ "$after" -eq "$before" ] && [ "$after" -gt 0 ] &&
  out=$(crun "$ref" sh -c "$(cat "$images/big.cmd")" 2>&1) && [ "$out" = hello-from-big ]; then
  refetched=$(status_json | jq '.counters.bytes_fetched')
  if [ "$refetched" -eq 0 ]; then
    pass "restart: $after layers remounted; a new container ran with 0 bytes refetched"
  else
    fail "restart: cached data refetched" "$refetched bytes fetched after restart"
  fi
else
  fail "restart: layers remounted and container runs" "before=$before after=$after out=${out:-}"
fi

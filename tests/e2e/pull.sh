#!/usr/bin/env bash
# End-to-end test of `shoal pull`: real containerd, a real registry and
# shoal-snapshotter (tests/e2e/lib.sh), no CRI. Needs root. Prints one
# PASS/FAIL line per check and ends with `pull: N passed, M failed`; exits
# non-zero if anything failed.
#
#   tests/e2e/pull.sh [--no-build]
#
# What it checks:
#   - plain gzip images (busybox:1, layered:1): every layer unpacked through
#     containerd's diff service; the container prints what it must; the
#     image's content is complete in containerd (ctr images check); a second
#     pull finds every layer present (and honours $CONTAINERD_ADDRESS and
#     $CONTAINERD_NAMESPACE).
#   - eStargz copies of both (ctr-remote image convert --estargz --oci, pushed
#     back, local copies removed): every layer mounted lazily (Prepare answers
#     AlreadyExists), `shoal status` lists them, and the container prints the
#     same output.
#   - an index (made here over the registry API): the host's platform is
#     picked, an absent --platform fails with a clear message.
#   - no lease is left behind, and `ctr images rm --sync` garbage-collects
#     every Shoal snapshot the pulls made.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

# shellcheck source=tests/e2e/lib.sh
source "$here/lib.sh"
e2e_simple_args "$@"

e2e_checks_begin pull

[ "$build" = 0 ] || e2e_build

cli="$repo/target/release/shoal"
[ -x "$cli" ] || { fail "cli: $cli not built"; summary 1; exit 1; }
for tool in ctr-remote jq curl; do
  command -v "$tool" >/dev/null || { fail "tools: $tool not installed (scripts/deps.sh)"; summary 1; exit 1; }
done

E2E_EXIT_HOOK=summary
e2e_world_start
pass "world: registry $E2E_REGISTRY, containerd and shoal-snapshotter under $E2E_DIR"

images="$E2E_DIR/images"
if out=$("$here/images.sh" "$images" "$E2E_REGISTRY" 2>&1); then
  pass "images: built and pushed busybox:1 and layered:1"
else
  fail "images: build and push" "$(tail -n 20 <<<"$out")"
  exit 1
fi

# spull ARGS...: shoal pull against the test world.
spull() {
  timeout 300 "$cli" pull --containerd-address "$E2E_DIR/containerd.sock" \
    --namespace "$E2E_NS" "$@"
}

run_id=0
# crun REF CMD...: ctr run --rm on Shoal with a fresh container id.
crun() {
  local ref=$1
  shift
  run_id=$((run_id + 1))
  E2E_CTR_TIMEOUT=120 e2e_ctr run --rm --snapshotter shoal "$ref" "e2e-pull-$run_id" "$@"
}

# check_pull NAME JSON-FILE WANT: the summary says every layer is WANT
# (lazy, unpacked or present).
check_pull() {
  local name=$1 json=$2 want=$3 n got
  n=$(jq '.layers | length' "$json")
  got=$(jq -r --arg w "$want" '[.layers[] | select(.outcome == $w)] | length' "$json")
  if [ "$n" -gt 0 ] && [ "$got" = "$n" ] && [ "$(jq ".$want" "$json")" = "$n" ]; then
    pass "$name: all $n layers $want"
  else
    fail "$name: all layers $want" "$(jq -c '[.layers[] | {digest, outcome}]' "$json")"
  fi
}

# run_check NAME REF IMAGE: the container prints IMAGE's expected output.
run_check() {
  local name=$1 ref=$2 img=$3 d out="$E2E_DIR/${1//\//-}.out"
  if crun "$ref" sh -c "$(cat "$images/$img.cmd")" >"$out" 2>&1; then
    if d=$(diff -u "$images/$img.out" "$out"); then
      pass "$name: ctr run --snapshotter shoal prints the expected output"
    else
      fail "$name: ctr run output" "$(head -n 40 <<<"$d")"
    fi
  else
    fail "$name: ctr run" "$(tail -n 20 "$out")"
  fi
}

# pull_check NAME REF WANT: shoal pull --json REF, all layers WANT.
pull_check() {
  local name=$1 ref=$2 want=$3 json="$E2E_DIR/${1//\//-}.json" t0=$SECONDS
  if spull --json "$ref" >"$json" 2>"$json.err"; then
    pass "$name: shoal pull $ref ($((SECONDS - t0))s)"
    sed 's/^/      | /' "$json.err"
    check_pull "$name" "$json" "$want"
  else
    fail "$name: shoal pull $ref" "$(tail -n 20 "$json.err")"
  fi
}

# --- Plain gzip images: the normal-unpack path. ---
for name in busybox layered; do
  ref=$(cat "$images/$name.ref")
  pull_check "gzip/$name" "$ref" unpacked
  run_check "gzip/$name" "$ref" "$name"
  if out=$(e2e_ctr images check "name==$ref" 2>&1) && grep -q complete <<<"$out" && ! grep -q incomplete <<<"$out"; then
    pass "gzip/$name: ctr images check: content complete"
  else
    fail "gzip/$name: ctr images check" "$out"
  fi
done

# GC labels as containerd's own pull sets them: manifest -> config and
# layers, config -> the top snapshot.
json="$E2E_DIR/gzip-layered.json"
config=$(jq -r .config "$json")
manifest=$(jq -r .manifest "$json")
top=$(jq -r '.layers[-1].chain_id' "$json")
layer0=$(jq -r '.layers[0].digest' "$json")
if content=$(e2e_ctr content ls 2>&1) &&
  grep "^$manifest" <<<"$content" | grep -q "containerd.io/gc.ref.content.config=$config" &&
  grep "^$manifest" <<<"$content" | grep -q "containerd.io/gc.ref.content.l.0=$layer0" &&
  grep "^$config" <<<"$content" | grep -q "containerd.io/gc.ref.snapshot.shoal=$top" &&
  grep "^$layer0" <<<"$content" | grep -q "containerd.io/uncompressed=$(jq -r '.layers[0].chain_id' "$json")"; then
  pass "gzip/layered: GC labels on manifest, config and layer content"
else
  fail "gzip/layered: GC labels" "$(grep -e "^$manifest" -e "^$config" -e "^$layer0" <<<"$content")"
fi

# Human-readable output: one line per layer and a summary.
ref=$(cat "$images/busybox.ref")
if out=$(spull "$ref" 2>&1) && grep -q '^layer 1/1 .* present ' <<<"$out" &&
  grep -q "^pulled $ref (sha256:.*) into shoal: 1 layer(s): 0 lazy, 0 unpacked, 1 already present" <<<"$out"; then
  pass "gzip/busybox: progress and summary lines"
  sed 's/^/      | /' <<<"$out"
else
  fail "gzip/busybox: progress and summary lines" "$out"
fi

# Again, through the environment variables: nothing left to do.
ref=$(cat "$images/layered.ref")
if out=$(CONTAINERD_ADDRESS="$E2E_DIR/containerd.sock" CONTAINERD_NAMESPACE="$E2E_NS" \
  timeout 300 "$cli" pull --json "$ref" 2>&1 >"$E2E_DIR/again.json"); then
  pass "gzip/layered: second pull via \$CONTAINERD_ADDRESS/\$CONTAINERD_NAMESPACE"
  check_pull "gzip/layered again" "$E2E_DIR/again.json" present
else
  fail "gzip/layered: second pull via environment" "$out"
fi

# --- eStargz: the lazy path. ---
for name in busybox layered; do
  src=$(cat "$images/$name.ref")
  dst="$E2E_REGISTRY/$name-esgz:1"
  if out=$(e2e_ctr images pull --plain-http "$src" 2>&1 &&
    timeout 300 ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" \
      image convert --estargz --oci "$src" "$dst" 2>&1 &&
    e2e_ctr images push --plain-http "$dst" 2>&1 &&
    e2e_ctr images rm --sync "$src" "$dst" 2>&1); then
    pass "estargz/$name: converted with ctr-remote, pushed as $dst, local copies removed"
  else
    fail "estargz/$name: convert and push" "$(tail -n 20 <<<"$out")"
    continue
  fi
  pull_check "estargz/$name" "$dst" lazy
  run_check "estargz/$name" "$dst" "$name"
done

if out=$("$cli" status --address "$E2E_DIR/shoal.sock" --json 2>&1) &&
  n=$(jq '[.layers[] | select(.image_ref | test("-esgz:1$"))] | length' <<<"$out") &&
  [ "$n" -gt 0 ]; then
  pass "shoal status: $n lazily mounted eStargz layer(s)"
else
  fail "shoal status lists the lazy layers" "$out"
fi

# --- An index: platform selection. ---
busybox_ref=$(cat "$images/busybox.ref")
repo_path=${busybox_ref#"$E2E_REGISTRY"/}
repo_path=${repo_path%%:*}
accept="application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json"
mdigest=$(curl -fsSI -H "Accept: $accept" "http://$E2E_REGISTRY/v2/$repo_path/manifests/1" |
  tr -d '\r' | awk 'tolower($1) == "docker-content-digest:" { print $2 }')
mtype=$(curl -fsSI -H "Accept: $accept" "http://$E2E_REGISTRY/v2/$repo_path/manifests/1" |
  tr -d '\r' | awk 'tolower($1) == "content-type:" { print $2 }')
msize=$(curl -fsS -H "Accept: $accept" "http://$E2E_REGISTRY/v2/$repo_path/manifests/1" | wc -c)
host_arch=$(case $(uname -m) in x86_64) echo amd64 ;; aarch64) echo arm64 ;; *) uname -m ;; esac)
other_arch=$([ "$host_arch" = ppc64le ] && echo s390x || echo ppc64le)
index=$(jq -cn --arg d "$mdigest" --arg t "$mtype" --argjson s "$msize" \
  --arg host "$host_arch" --arg other "$other_arch" '{
    schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
    manifests: [
      {mediaType: $t, digest: $d, size: $s, platform: {os: "linux", architecture: $other}},
      {mediaType: $t, digest: $d, size: $s, platform: {os: "linux", architecture: $host}}
    ]}')
index_ref="$E2E_REGISTRY/$repo_path:index"
if [ -n "$mdigest" ] && out=$(curl -fsS -X PUT -H "Content-Type: application/vnd.oci.image.index.v1+json" \
  --data-binary "$index" "http://$E2E_REGISTRY/v2/$repo_path/manifests/index" 2>&1); then
  json="$E2E_DIR/index.json"
  if spull --json "$index_ref" >"$json" 2>"$json.err"; then
    idigest="sha256:$(printf '%s' "$index" | sha256sum | cut -d' ' -f1)"
    if [ "$(jq -r .digest "$json")" = "$idigest" ] && [ "$(jq -r .manifest "$json")" = "$mdigest" ] &&
      [ "$(jq -r .media_type "$json")" = application/vnd.oci.image.index.v1+json ]; then
      pass "index: the image points at the index, the host's manifest was picked"
    else
      fail "index: digests" "$(jq -c '{digest, manifest, media_type}' "$json"); want index $idigest manifest $mdigest"
    fi
  else
    fail "index: shoal pull $index_ref" "$(tail -n 20 "$json.err")"
  fi
  run_check "index" "$index_ref" busybox
  if out=$(spull --platform linux/riscv64 "$index_ref" 2>&1); then
    fail "index: --platform linux/riscv64 must fail" "$out"
  elif grep -q "no manifest for platform linux/riscv64" <<<"$out"; then
    pass "index: --platform linux/riscv64 fails: $(tail -n 1 <<<"$out")"
  else
    fail "index: --platform linux/riscv64 error message" "$out"
  fi
else
  fail "index: push an index over the registry API" "${out:-no manifest digest}"
fi

# --- Errors are clear. ---
if out=$(spull "$E2E_REGISTRY/does-not-exist:1" 2>&1); then
  fail "missing image must fail" "$out"
elif grep -q "not found" <<<"$out"; then
  pass "missing image fails: $(tail -n 1 <<<"$out")"
else
  fail "missing image error message" "$out"
fi
if out=$(timeout 60 "$cli" pull --containerd-address "$E2E_DIR/nope.sock" "$busybox_ref" 2>&1); then
  fail "unreachable containerd must fail" "$out"
elif grep -q "connect to containerd at $E2E_DIR/nope.sock" <<<"$out"; then
  pass "unreachable containerd fails: $(tail -n 1 <<<"$out")"
else
  fail "unreachable containerd error message" "$out"
fi

# --- Leases and garbage collection. ---
if leases=$(e2e_ctr leases ls 2>&1) && ! grep -q shoal-pull <<<"$leases"; then
  pass "no shoal-pull lease left behind"
else
  fail "no shoal-pull lease left behind" "$leases"
fi
mapfile -t rm_refs < <(e2e_ctr images ls -q)
if out=$(e2e_ctr images rm --sync "${rm_refs[@]}" 2>&1); then
  left=$(e2e_ctr snapshots --snapshotter shoal ls | awk 'NR > 1')
  if [ -z "$left" ]; then
    pass "ctr images rm --sync garbage-collects every Shoal snapshot"
  else
    fail "ctr images rm --sync garbage-collects every Shoal snapshot" "$left"
  fi
else
  fail "ctr images rm --sync" "$out"
fi

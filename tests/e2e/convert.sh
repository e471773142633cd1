#!/usr/bin/env bash
# End-to-end test of `shoal convert` and of lazy pulls by any containerd
# client, with real parts: images built here (images.sh), docker-registry,
# containerd 1.6, shoal-snapshotter. Needs root.
# Prints PASS/FAIL lines and ends with `convert: N passed, M failed`.
#
#   tests/e2e/convert.sh [--no-build]
#
# Checks:
#   - shoal convert (registry -> registry, and into an OCI layout) of the
#     busybox, layered and big test images; layers are tar+zstd with Shoal's
#     annotations;
#   - reproducible: converting again (--force, and into a second layout)
#     gives identical digests; an existing tag is refused without --force;
#   - round trip: the converted images pulled under overlayfs (full pull) and
#     lazily under Shoal give trees identical to umoci's unpack of the source;
#     eStargz and zstd:chunked sources (ctr-remote) convert to the same tree;
#   - any client: containerd's Go client Pull with unpack (what nerdctl and
#     CRI do; tests/e2e/anyclient, no cri.* labels) mounts every layer of a
#     converted image through Shoal; containerd fetches no layer blob, and the
#     registry sends (containerd + Shoal, before the program's output) a small
#     fraction of the image's bytes;
#   - a multi-platform index converts platform by platform;
#   - bad input: a layer whose bytes don't match its descriptor, a layer with
#     a `..` entry, and an unknown layer media type are refused with the
#     layer named, and nothing is tagged.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/e2e/lib.sh
source "$here/lib.sh"
e2e_simple_args "$@"

e2e_checks_begin convert
[ "$build" = 0 ] || e2e_build

# The Go test client (containerd's Go client, GOPATH mode).
if ANYCLIENT=$("$here/anyclient/build.sh" 2>"${TMPDIR:-/tmp}/anyclient-build.log"); then
  pass "anyclient: built (containerd Go client, GOPATH mode)"
else
  fail "anyclient: build" "$(tail -n 20 "${TMPDIR:-/tmp}/anyclient-build.log")"
  exit 1
fi

E2E_EXIT_HOOK=summary
export E2E_SHOAL_CONFIG_TEXT='version = 1
[remote]
background_fetch = false
# These checks count what reads fetched: no whole-blob identity pass.
verify_layers = false'
e2e_world_start
cli="$repo/target/release/shoal"
manifest() { # REPO TAG
  curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json' \
    "http://$E2E_REGISTRY/v2/$1/manifests/$2"
}
conv() { timeout 600 "$cli" convert -q --work-dir "$E2E_DIR" "$@"; }

images="$E2E_DIR/images"
"$here/images.sh" "$images" "$E2E_REGISTRY" busybox layered big >/dev/null 2>&1 ||
  { fail "images: build"; exit 1; }
pass "images: busybox:1, layered:1, big:1 built and pushed"

# --- Convert, and check the result's shape.
for name in busybox layered big; do
  src=$(cat "$images/$name.ref")
  if out=$(conv --json "$src" "$E2E_REGISTRY/$name:shoal" 2>&1); then
    echo "$out" >"$E2E_DIR/$name.convert.json"
    m=$(manifest "$name" shoal)
    bad=$(jq -r --arg r "$E2E_REGISTRY/$name" '.layers[] | select(
        .mediaType != "application/vnd.oci.image.layer.v1.tar+zstd"
        or .annotations["containerd.io/snapshot/shoal.layer.digest"] != .digest
        or .annotations["containerd.io/snapshot/shoal.source"] != $r
        or (.annotations["containerd.io/snapshot/stargz/toc.digest"] | test("^sha256:[0-9a-f]{64}$") | not))
        | .digest' <<<"$m")
    n=$(jq '.layers | length' <<<"$m")
    if [ -z "$bad" ] && [ "$n" -gt 0 ]; then
      pass "$name: converted ($n tar+zstd layers with TOC, layer-digest and source annotations)"
    else
      fail "$name: converted layer annotations" "$m"
    fi
  else
    fail "$name: shoal convert" "$(tail -n 10 <<<"$out")"
  fi
done

# --- Reproducible; --force.
name=layered
src=$(cat "$images/$name.ref")
first=$(jq -r .digest "$E2E_DIR/$name.convert.json")
if out=$(conv "$src" "$E2E_REGISTRY/$name:shoal" 2>&1); then
  fail "existing tag refused without --force" "convert succeeded: $out"
elif grep -q -- "--force" <<<"$out"; then
  pass "existing tag refused without --force"
else
  fail "existing tag refused without --force" "$out"
fi
again=$(conv --json --force "$src" "$E2E_REGISTRY/$name:shoal" 2>/dev/null | jq -r .digest || true)
a=$(conv --json "$src" "oci:$E2E_DIR/layout-a:$name" 2>/dev/null | jq -c '[.digest, [.manifests[].layers[].digest]]' || true)
b=$(conv --json "$src" "oci:$E2E_DIR/layout-b:$name" 2>/dev/null | jq -c '[.digest, [.manifests[].layers[].digest]]' || true)
layers_reg=$(jq -c '[.manifests[].layers[].digest]' "$E2E_DIR/$name.convert.json")
if [ "$again" = "$first" ] && [ -n "$a" ] && [ "$a" = "$b" ] && [ "$(jq -c '.[1]' <<<"$a")" = "$layers_reg" ]; then
  pass "reproducible: converting again gives $first; two OCI layouts and the registry agree on every layer digest"
else
  fail "reproducible" "registry: $first then $again; layouts: $a / $b; registry layers: $layers_reg"
fi
# OCI layout -> registry: the layout written above is a valid source too.
if conv "oci:$E2E_DIR/layout-a:$name" "$E2E_REGISTRY/$name:from-layout" >/dev/null 2>&1 &&
  [ "$(manifest "$name" from-layout | jq -c '[.layers[].digest]')" = "$layers_reg" ]; then
  pass "oci layout source: a converted layout converts again to the same layers"
else
  fail "oci layout source" "$(manifest "$name" from-layout)"
fi

# --- Round trip: overlayfs full pull and Shoal lazy pull, trees vs umoci's unpack.
run_id=0
for name in busybox layered big; do
  ref="$E2E_REGISTRY/$name:shoal"
  e2e_tree_host "$images/ref/$name/rootfs" >"$E2E_DIR/ref-$name.txt"
  run_id=$((run_id + 1))
  if e2e_ctr image pull -q --plain-http "$ref" >/dev/null 2>&1 &&
    e2e_tree_container overlayfs "$ref" "conv-o-$run_id" >"$E2E_DIR/o-$name.txt" 2>"$E2E_DIR/o-$name.err" &&
    [ -s "$E2E_DIR/o-$name.txt" ] && d=$(diff -u "$E2E_DIR/ref-$name.txt" "$E2E_DIR/o-$name.txt"); then
    pass "$name: overlayfs (full pull, no Shoal) tree identical to the source ($(wc -l <"$E2E_DIR/o-$name.txt") paths)"
  else
    fail "$name: overlayfs round trip" "$(head -n 30 <<<"${d:-$(cat "$E2E_DIR/o-$name.err")}")"
  fi
done
# eStargz and zstd:chunked sources (made by ctr-remote): re-chunked, and the
# artefacts of those formats (stargz.index.json, landmarks) dropped, so the
# tree equals the original image's.
command -v ctr-remote >/dev/null ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stargz-snapshotter >/dev/null
ctr_remote() { timeout 300 ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" "$@"; }
src=$(cat "$images/layered.ref")
e2e_ctr image pull -q --plain-http "$src" >/dev/null
for fmt in esgz zstdchunked; do
  ref="$E2E_REGISTRY/layered:from-$fmt"
  run_id=$((run_id + 1))
  if out=$(ctr_remote image convert "--$( [ $fmt = esgz ] && echo estargz || echo zstdchunked)" --oci "$src" "$src-$fmt" 2>&1) &&
    out=$(e2e_ctr image push --plain-http "$src-$fmt" 2>&1) &&
    out=$(conv "$src-$fmt" "$ref" 2>&1) &&
    out=$(e2e_ctr image pull -q --plain-http "$ref" 2>&1) &&
    e2e_tree_container overlayfs "$ref" "conv-f-$run_id" >"$E2E_DIR/f-$fmt.txt" 2>"$E2E_DIR/f-$fmt.err" &&
    [ -s "$E2E_DIR/f-$fmt.txt" ] && d=$(diff -u "$E2E_DIR/ref-layered.txt" "$E2E_DIR/f-$fmt.txt"); then
    pass "layered: $fmt source (ctr-remote) converted; overlayfs tree identical to the original image"
  else
    fail "layered: $fmt source" "$(head -n 30 <<<"${d:-$out}")"
  fi
done

# Start Shoal's pulls from an empty content store.
e2e_ctr image ls -q | xargs -r -n 20 "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" image rm >/dev/null
e2e_ctr content ls -q | xargs -r -n 20 "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" content rm >/dev/null 2>&1 || true

# Bytes the registry sent Shoal after line $1 of its log: the 206 answers
# to its Range requests (footers, TOCs, chunks), from the debug log lines.
shoal_log_bytes() {
  tail -n +"$(($1 + 1))" "$E2E_DIR/logs/shoal.log" | grep 'registry request' | grep 'status=206' |
    sed -n 's/.*bytes=\([0-9]*\)-\([0-9]*\).*/\1 \2/p' | awk '{ s += $2 - $1 + 1 } END { print s + 0 }'
}
# big first: nothing of it is cached by an earlier pull.
for name in big busybox layered; do
  ref="$E2E_REGISTRY/$name:shoal"
  m=$(manifest "$name" shoal)
  log_mark=$(wc -l <"$E2E_DIR/logs/shoal.log")
  total=$(jq '[.layers[].size] | add' <<<"$m")
  if ! out=$("$ANYCLIENT" -address "$E2E_DIR/containerd.sock" -namespace "$E2E_NS" "$ref" 2>&1); then
    fail "$name: anyclient pull (Go client, unpack into shoal)" "$(tail -n 10 <<<"$out")"
    continue
  fi
  missing=() downloaded=()
  for l in $(jq -r '.layers[].digest' <<<"$m"); do
    grep -qF "shoal:$l " /proc/mounts || missing+=("$l")
    e2e_ctr content ls -q | grep -qx "$l" && downloaded+=("$l")
  done
  if [ ${#missing[@]} -eq 0 ] && [ ${#downloaded[@]} -eq 0 ]; then
    pass "$name: Go client Pull+unpack, no cri.* labels: every layer FUSE-mounted; containerd downloaded no layer blob"
  else
    fail "$name: any-client lazy pull" "not mounted: ${missing[*]:-none}; downloaded by containerd: ${downloaded[*]:-none}"
  fi
  run_id=$((run_id + 1))
  if out2=$(E2E_CTR_TIMEOUT=120 e2e_ctr run --rm --snapshotter shoal "$ref" "conv-s-$run_id" sh -c "$(cat "$images/$name.cmd")" 2>&1) &&
    [ "$out2" = "$(cat "$images/$name.out")" ]; then
    pass "$name: program output correct under Shoal"
  else
    fail "$name: program output under Shoal" "$(head -n 20 <<<"$out2")"
  fi
  if [ "$name" = big ]; then
    # Registry bytes before the output: containerd's own (manifest, config)
    # plus Shoal's (footers, TOCs, chunks read). The program needs busybox
    # (~1 MiB compressed), never the 32 MiB file.
    shoal_bytes=$(shoal_log_bytes "$log_mark")
    ctr_bytes=$(jq .bytes <<<"$out")
    sum=$((shoal_bytes + ctr_bytes))
    if [ "$total" -gt $((32 << 20)) ] && [ "$shoal_bytes" -gt 0 ] && [ $((sum * 100 / total)) -le 10 ]; then
      pass "$name: registry sent $sum of $total image bytes ($((sum * 100 / total))% <= 10%: containerd $ctr_bytes in $(jq .requests <<<"$out") requests, Shoal $shoal_bytes)"
    else
      fail "$name: fraction fetched" "containerd $ctr_bytes + Shoal $shoal_bytes of $total bytes"
    fi
  fi
  run_id=$((run_id + 1))
  tree="$E2E_DIR/s-$name.txt"
  if e2e_tree_container shoal "$ref" "conv-t-$run_id" >"$tree" 2>"$tree.err" && [ -s "$tree" ] &&
    d=$(diff -u "$E2E_DIR/ref-$name.txt" "$tree"); then
    pass "$name: Shoal (lazy) tree identical to the source ($(wc -l <"$tree") paths)"
  else
    fail "$name: Shoal round trip" "$(head -n 30 <<<"${d:-$(cat "$tree.err")}")"
  fi
done

# --- Bad input: refused, the layer named, nothing tagged.
bad_layout() { # NAME: a copy of busybox's OCI layout as oci:$E2E_DIR/bad-NAME:t
  local dir="$E2E_DIR/bad-$1"
  rm -rf "$dir"
  skopeo copy -q --src-tls-verify=false "docker://$(cat "$images/busybox.ref")" "oci:$dir:t" >/dev/null
  echo "$dir"
}
expect_refused() { # WHAT DIR DIGEST PATTERN
  local out
  if out=$(conv "oci:$2:t" "$E2E_REGISTRY/bad:$1" 2>&1); then
    fail "bad input ($1): refused" "convert succeeded"
  elif grep -qF "$3" <<<"$out" && grep -qE "$4" <<<"$out" &&
    ! manifest bad "$1" >/dev/null; then
    pass "bad input ($1): refused naming the layer; nothing tagged"
  else
    fail "bad input ($1)" "$out"
  fi
}
# Bytes that don't match the descriptor.
dir=$(bad_layout digest)
layer=$(jq -r '.manifests[0].digest' "$dir/index.json" | sed 's/sha256://')
layer=$(jq -r '.layers[0].digest' "$dir/blobs/sha256/$layer")
printf 'x' | dd of="$dir/blobs/sha256/${layer#sha256:}" bs=1 seek=100 conv=notrunc 2>/dev/null
expect_refused digest "$dir" "$layer" "does not match its descriptor"
# A layer holding ../escape, and a layer of unknown media type.
for what in escape mediatype; do
  dir=$(bad_layout "$what")
  layer=$(python3 - "$dir" "$what" <<'PY'
import gzip, hashlib, io, json, os, sys, tarfile
d, what = sys.argv[1], sys.argv[2]
blob = lambda dg: os.path.join(d, "blobs/sha256", dg.split(":")[1])
def put(b):
    dg = "sha256:" + hashlib.sha256(b).hexdigest()
    open(blob(dg), "wb").write(b)
    return dg
idx = json.load(open(os.path.join(d, "index.json")))
m = json.load(open(blob(idx["manifests"][0]["digest"])))
cfg = json.load(open(blob(m["config"]["digest"])))
raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as t:
    ti = tarfile.TarInfo("../escape" if what == "escape" else "ok")
    ti.size = 2
    t.addfile(ti, io.BytesIO(b"x\n"))
tar = raw.getvalue()
gz = gzip.compress(tar, mtime=0)
dg = put(gz)
mt = "application/vnd.oci.image.layer.v1.tar+gzip" if what == "escape" else "application/vnd.example.unknown"
m["layers"].append({"mediaType": mt, "digest": dg, "size": len(gz)})
cfg["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(tar).hexdigest())
c = json.dumps(cfg).encode(); m["config"]["digest"] = put(c); m["config"]["size"] = len(c)
mb = json.dumps(m).encode()
idx["manifests"][0].update(digest=put(mb), size=len(mb))
json.dump(idx, open(os.path.join(d, "index.json"), "w"))
print(dg)
PY
)
  pattern="escapes the layer root"
  [ "$what" = escape ] || pattern="unknown layer media type"
  expect_refused "$what" "$dir" "$layer" "$pattern"
done

# --- A multi-platform index: converted platform by platform; an attestation
# entry (platform unknown/unknown) is left out.
dir=$(bad_layout index)
python3 - "$dir" <<'PY'
import hashlib, json, os, sys
d = sys.argv[1]
blob = lambda dg: os.path.join(d, "blobs/sha256", dg.split(":")[1])
def put(b):
    dg = "sha256:" + hashlib.sha256(b).hexdigest()
    open(blob(dg), "wb").write(b)
    return dg
idx = json.load(open(os.path.join(d, "index.json")))
top = idx["manifests"][0]
m = json.load(open(blob(top["digest"])))
cfg = json.load(open(blob(m["config"]["digest"])))
descs = []
for arch in ["amd64", "arm64"]:
    cfg["architecture"] = arch
    c = json.dumps(cfg).encode()
    m["config"]["digest"], m["config"]["size"] = put(c), len(c)
    mb = json.dumps(m).encode()
    descs.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(mb),
                  "size": len(mb), "platform": {"os": "linux", "architecture": arch}})
descs.append(dict(descs[0], platform={"os": "unknown", "architecture": "unknown"}))
ib = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": descs}).encode()
top.update(mediaType="application/vnd.oci.image.index.v1+json", digest=put(ib), size=len(ib))
json.dump(idx, open(os.path.join(d, "index.json"), "w"))
PY
if out=$(conv --json "oci:$dir:t" "$E2E_REGISTRY/multi:shoal" 2>&1); then
  idx=$(manifest multi shoal)
  plats=$(jq -c '[.manifests[].platform.architecture]' <<<"$idx")
  kinds=$(for d in $(jq -r '.manifests[].digest' <<<"$idx"); do manifest multi "$d" | jq -r '.layers[].mediaType'; done | sort -u)
  if [ "$(jq -r .mediaType <<<"$idx")" = application/vnd.oci.image.index.v1+json ] &&
    [ "$plats" = '["amd64","arm64"]' ] && [ "$kinds" = application/vnd.oci.image.layer.v1.tar+zstd ] &&
    [ "$(jq '.skipped | length' <<<"$out")" = 1 ] && [ "$(jq '.manifests | length' <<<"$out")" = 2 ]; then
    pass "multi-platform index: amd64 and arm64 converted, the attestation entry left out"
  else
    fail "multi-platform index" "$idx / $out"
  fi
else
  fail "multi-platform index: convert" "$out"
fi

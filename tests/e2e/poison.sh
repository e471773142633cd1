#!/usr/bin/env bash
# End-to-end test of layer poisoning through the chain ID (issue 12 §1), with
# real containerd, registry, ctr-remote and FUSE. Needs root.
# Prints PASS/FAIL lines and ends with `poison: N passed, M failed`.
#
#   tests/e2e/poison.sh [--no-build]
#
# The attack: an image whose config copies a base image's `rootfs.diff_ids`
# but whose layer is a valid eStargz of other files (its TOC verifies against
# its own annotation). containerd names layers by chain ID (from diff_ids),
# so once the attacker's layer is mounted lazily under the base's chain ID,
# a lazy snapshotter that never checks the diffID serves the attacker's files
# to every later image on that base.
#
# Checks:
#   - control: honest eStargz and zstd:chunked layers pulled lazily end up
#     `verified` (the diffID pass agrees with containerd's chain IDs), and
#     their containers read correctly;
#   - the attacker's lazy layer is quarantined (status, counter), its reads
#     fail, and running the attacker image again fails;
#   - same namespace: the victim (plain image on the base, pulled through
#     Shoal after the attacker) never sees the attacker's files: its pull
#     fails with an error naming the quarantine, or it sees the base;
#   - across namespaces: a lazy victim (the base's own eStargz) pulled in a
#     second namespace right after the attacker sees the true base content,
#     and a plain victim there too.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/e2e/lib.sh
source "$here/lib.sh"
e2e_simple_args "$@"

e2e_checks_begin poison

[ "$build" = 0 ] || e2e_build
command -v ctr-remote >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stargz-snapshotter >/dev/null
}

# The check starts 1 s after mounting (default 5 s).
E2E_SHOAL_CONFIG_TEXT='version = 1
[remote]
background_delay_secs = 1'
E2E_EXIT_HOOK=summary
e2e_world_start
cli="$repo/target/release/shoal"
status_json() { "$cli" status --address "$E2E_DIR/shoal.sock" --json; }
ns_b="$E2E_NS-b"
ctr_b() { timeout 300 ctr --address "$E2E_DIR/containerd.sock" --namespace "$ns_b" "$@"; }
rpull() { # NS REF
  timeout 300 ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$1" \
    image rpull --plain-http --snapshotter shoal "$2"
}
run_id=0
run_in() { # NS REF CMD...: run a container, print its output
  local ns=$1 ref=$2; shift 2
  run_id=$((run_id + 1))
  timeout 120 ctr --address "$E2E_DIR/containerd.sock" --namespace "$ns" \
    run --rm --snapshotter shoal "$ref" "poison-$run_id" "$@"
}
cleanup_ns_b() {
  ctr_b image ls -q 2>/dev/null | xargs -r -n 20 "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$ns_b" image rm >/dev/null 2>&1 || true
}

# --- Images -----------------------------------------------------------------
work="$E2E_DIR/images"
oci="$work/oci"
mkdir -p "$work"
umoci init --layout "$oci"
build_one() { # TAG MARKER: busybox + /etc/shoal-marker, one layer, pushed as TAG
  local tag=$1 marker=$2 b="$work/bundle-$1"
  umoci new --image "$oci:$tag"
  umoci config --image "$oci:$tag" --config.env PATH=/bin --config.cmd /bin/sh
  umoci unpack --image "$oci:$tag" "$b" >/dev/null
  mkdir -p "$b/rootfs/bin" "$b/rootfs/etc"
  cp /bin/busybox "$b/rootfs/bin/busybox"
  ln -s busybox "$b/rootfs/bin/sh"
  ln -s busybox "$b/rootfs/bin/cat"
  printf '%s\n' "$marker" >"$b/rootfs/etc/shoal-marker"
  umoci repack --refresh-bundle --image "$oci:$tag" "$b" >/dev/null
  skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$oci:$tag" "docker://$E2E_REGISTRY/$tag" >/dev/null
}
build_one base:1 base-content
build_one evilsrc:1 ATTACKER-CONTENT
build_one good:1 good-content
# victim:1 = base:1 + one more layer.
vb="$work/bundle-victim"
umoci unpack --image "$oci:base:1" "$vb" >/dev/null
echo victim >"$vb/rootfs/etc/victim"
umoci repack --refresh-bundle --image "$oci:base:1" "$vb" >/dev/null
skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$oci:base:1" "docker://$E2E_REGISTRY/victim:1" >/dev/null
# (base:1 in the layout now has two layers; the registry's base:1 keeps one.)

convert() { # SRC FLAG DST
  e2e_ctr image pull -q --plain-http "$E2E_REGISTRY/$1" >/dev/null
  ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" \
    image convert "$2" --oci "$E2E_REGISTRY/$1" "$E2E_REGISTRY/$3" >/dev/null
  e2e_ctr image push --plain-http "$E2E_REGISTRY/$3" >/dev/null 2>&1
}
convert base:1 --estargz base:esgz
convert evilsrc:1 --estargz evilsrc:esgz
convert good:1 --estargz good:esgz
convert good:1 --zstdchunked good:zstd

# forge SRC_REPO:TAG DIFFIDS_FROM_REPO:TAG DST_REPO:TAG: SRC's manifest and
# layers, with a config whose diff_ids are copied from the other image.
forge() {
  python3 - "$E2E_REGISTRY" "$1" "$2" "$3" <<'PY'
import hashlib, json, sys, urllib.request
reg, src, donor, dst = sys.argv[1:]
ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
def get(path, accept=None):
    req = urllib.request.Request(f"http://{reg}/v2/{path}", headers={"Accept": accept} if accept else {})
    return urllib.request.urlopen(req).read()
def manifest(ref):
    repo, tag = ref.split(":")
    return repo, json.loads(get(f"{repo}/manifests/{tag}", ACCEPT))
srepo, m = manifest(src)
drepo, dm = manifest(donor)
cfg = json.loads(get(f"{srepo}/blobs/{m['config']['digest']}"))
dcfg = json.loads(get(f"{drepo}/blobs/{dm['config']['digest']}"))
assert len(cfg["rootfs"]["diff_ids"]) == len(dcfg["rootfs"]["diff_ids"]) == 1
cfg["rootfs"]["diff_ids"] = dcfg["rootfs"]["diff_ids"]
body = json.dumps(cfg).encode()
digest = "sha256:" + hashlib.sha256(body).hexdigest()
drepo_name, dtag = dst.split(":")
# Cross-mount the layers, upload the config, put the manifest.
for l in m["layers"]:
    req = urllib.request.Request(f"http://{reg}/v2/{drepo_name}/blobs/uploads/?mount={l['digest']}&from={srepo}", method="POST")
    urllib.request.urlopen(req).read()
req = urllib.request.Request(f"http://{reg}/v2/{drepo_name}/blobs/uploads/", method="POST")
loc = urllib.request.urlopen(req).headers["Location"]
loc = loc if loc.startswith("http") else f"http://{reg}{loc}"
sep = "&" if "?" in loc else "?"
req = urllib.request.Request(f"{loc}{sep}digest={digest}", data=body, method="PUT",
                             headers={"Content-Type": "application/octet-stream"})
urllib.request.urlopen(req).read()
m["config"]["digest"], m["config"]["size"] = digest, len(body)
mb = json.dumps(m).encode()
req = urllib.request.Request(f"http://{reg}/v2/{drepo_name}/manifests/{dtag}", data=mb, method="PUT",
                             headers={"Content-Type": m.get("mediaType", "application/vnd.oci.image.manifest.v1+json")})
urllib.request.urlopen(req).read()
print(dcfg["rootfs"]["diff_ids"][0])
PY
}
# Attacker 1 claims the plain base's chain ID; attacker 2 that of the base's
# eStargz (what a lazy victim's layer is named).
plain_chain=$(forge evilsrc:esgz base:1 evil:plain)
esgz_chain=$(forge evilsrc:esgz base:esgz evil:esgz)
# Only what the test pulls from now on is in containerd.
e2e_ctr image ls -q | xargs -r -n 20 "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" image rm >/dev/null
pass "images: base, victim (base + 1 layer), eStargz/zstd:chunked controls, two forged attacker images"

layer_field() { # CHAIN FIELD
  status_json | jq -r --arg s "$1" --arg f "$2" '.layers[] | select(.snapshot == $s) | .[$f]'
}
wait_identity() { # CHAIN STATE: up to 60 s
  local i
  for i in $(seq 1 120); do
    [ "$(layer_field "$1" identity)" = "$2" ] && return 0
    sleep 0.5
  done
  return 1
}
chain_of() { # REF (in the registry): chain ID of its only/first layer
  local repo=${1%:*} tag=${1##*:} m cfg
  m=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$E2E_REGISTRY/v2/$repo/manifests/$tag")
  cfg=$(jq -r .config.digest <<<"$m")
  curl -sf "http://$E2E_REGISTRY/v2/$repo/blobs/$cfg" | jq -r '.rootfs.diff_ids[0]'
}

# --- Control: honest lazy layers verify ---------------------------------------
for fmt in esgz zstd; do
  ref="$E2E_REGISTRY/good:$fmt"
  chain=$(chain_of "good:$fmt")
  if rpull "$E2E_NS" "$ref" >/dev/null 2>&1 && grep -qF "$chain" <(status_json | jq -r '.layers[].snapshot') &&
    out=$(run_in "$E2E_NS" "$ref" cat /etc/shoal-marker 2>&1) && [ "$out" = good-content ] &&
    wait_identity "$chain" verified; then
    pass "control $fmt: lazy layer verified (diffID pass agrees with containerd's chain ID), output correct"
  else
    fail "control $fmt: lazy layer verified" "identity=$(layer_field "$chain" identity) out=${out:-}"
  fi
done

# --- Attack in namespace A ------------------------------------------------------
before_q=$(status_json | jq '.counters.layers_quarantined')
if rpull "$E2E_NS" "$E2E_REGISTRY/evil:plain" >/dev/null 2>&1 &&
  grep -qF "$plain_chain" <(status_json | jq -r '.layers[].snapshot'); then
  pass "attacker (claims the plain base's chain ID) mounted lazily under $plain_chain"
else
  fail "attacker mounted lazily" "$(status_json | jq -c '[.layers[].snapshot]')"
fi
rpull "$E2E_NS" "$E2E_REGISTRY/evil:esgz" >/dev/null 2>&1 || fail "attacker 2 rpull"

# Across namespaces, at once (the attacker's layer may still be unverified):
# a lazy victim names its own blob under the same chain ID.
fallbacks_before=$(status_json | jq '.counters.fallbacks')
if rpull "$ns_b" "$E2E_REGISTRY/base:esgz" >"$E2E_DIR/b-pull.out" 2>&1; then
  out=$(run_in "$ns_b" "$E2E_REGISTRY/base:esgz" cat /etc/shoal-marker 2>&1) || true
else
  out="pull failed: $(tail -n 3 "$E2E_DIR/b-pull.out")"
fi
fallbacks=$(( $(status_json | jq '.counters.fallbacks') - fallbacks_before ))
if [ "$out" = base-content ] && [ "$fallbacks" -ge 1 ]; then
  pass "namespace B, lazy victim right after the attacker: sees the base ($fallbacks fallback to a checked pull)"
else
  fail "namespace B, lazy victim sees the base" "out=$out fallbacks=$fallbacks"
fi

if wait_identity "$plain_chain" quarantined && wait_identity "$esgz_chain" quarantined; then
  pass "attacker layers quarantined: $(layer_field "$plain_chain" identity_reason | cut -c1-150)..."
else
  fail "attacker layers quarantined" "identity=$(layer_field "$plain_chain" identity)/$(layer_field "$esgz_chain" identity)"
fi
q=$(( $(status_json | jq '.counters.layers_quarantined') - before_q ))
[ "$q" -eq 2 ] && pass "quarantine counted ($q)" || fail "quarantine counted" "layers_quarantined +$q"

if out=$(run_in "$E2E_NS" "$E2E_REGISTRY/evil:plain" cat /etc/shoal-marker 2>&1); then
  fail "quarantined layer is not handed out again" "attacker container ran: $out"
elif grep -q quarantined <<<"$out"; then
  pass "quarantined layer is not handed out again (attacker run fails: $(grep -o 'quarantined[^:]*' <<<"$out" | head -n1))"
else
  fail "quarantined layer refused with a clear error" "$out"
fi

# Same namespace: the plain victim on the base, after the attacker.
if out=$(e2e_ctr image pull --plain-http --snapshotter shoal "$E2E_REGISTRY/victim:1" 2>&1); then
  out=$(run_in "$E2E_NS" "$E2E_REGISTRY/victim:1" cat /etc/shoal-marker 2>&1) || true
  if [ "$out" = base-content ]; then
    pass "namespace A, plain victim after the attacker: sees the base"
  else
    fail "namespace A, plain victim never sees the attacker" "$out"
  fi
elif grep -q quarantined <<<"$out" && ! grep -q ATTACKER <<<"$out"; then
  pass "namespace A, plain victim after the attacker: pull fails with a clear error ($(grep -o 'layer [^ ]* is quarantined' <<<"$out" | head -n1))"
else
  fail "namespace A, plain victim: clear error or base content" "$out"
fi

# Namespace B, plain victim.
out=
if out=$(ctr_b image pull --plain-http --snapshotter shoal "$E2E_REGISTRY/victim:1" 2>&1) &&
  out=$(run_in "$ns_b" "$E2E_REGISTRY/victim:1" cat /etc/shoal-marker 2>&1) && [ "$out" = base-content ]; then
  pass "namespace B, plain victim: sees the base"
else
  fail "namespace B, plain victim sees the base" "$(tail -n 3 <<<"$out")"
fi
cleanup_ns_b

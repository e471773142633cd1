#!/usr/bin/env bash
# End-to-end test of startup profiles, with real parts: a Debian bookworm +
# python3 image (the benchmark's root filesystem, debootstrapped once into
# $SHOAL_BENCH_CACHE), docker-registry, containerd 1.6, shoal-snapshotter.
# Needs root. Prints PASS/FAIL lines and ends with `profile: N passed, M failed`.
#
#   tests/e2e/profile.sh [--no-build]
#
# Checks:
#   - a python3 script importing a set of stdlib modules runs from the
#     converted image (lazy, Go client pull, no cri.* labels), and the daemon
#     records its first reads: `shoal profile show` lists the interpreter and
#     the modules;
#   - `shoal convert --profile` lays that startup set first and marks it;
#   - on a fresh node (new Shoal root: nothing cached), each TOC is fetched
#     at its annotated position (no HEAD, no footer read) and the startup set
#     in an early request beside it, while the container starts: at most 10
#     Range requests in all, and the script's reads fetch on demand at most
#     5% of the bytes they fetched without a profile (printed side by side);
#   - `shoal optimize SRC DST -- CMD` does all of it in one command, and
#     leaves no trial tag in the registry or image in containerd;
#   - strict fetch priority (remote::fetch::priority): on another fresh node with
#     the background fetch on (no delay), no Range request for bytes outside
#     the layers' startup sets (the python layer's rest, and a 16 MiB filler
#     layer the startup set doesn't touch) starts before the last
#     startup-set request has completed (request times from Shoal's log).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/e2e/lib.sh
source "$here/lib.sh"
e2e_simple_args "$@"
e2e_checks_begin profile
[ "$build" = 0 ] || e2e_build

# The benchmark's Debian bookworm + python3 root filesystem, shared.
ROOTFS=$("$here/rootfs.sh") || { fail "setup: the python3 root filesystem (tests/e2e/rootfs.sh)"; summary 1; exit 1; }
anyclient=$("$here/anyclient/build.sh" 2>"${TMPDIR:-/tmp}/anyclient-build.log") ||
  { fail "anyclient: build" "$(tail -n 20 "${TMPDIR:-/tmp}/anyclient-build.log")"; summary 1; exit 1; }

E2E_EXIT_HOOK=summary
export E2E_SHOAL_CONFIG_TEXT='version = 1
[remote]
background_fetch = false
# These checks count what reads fetched: no whole-blob identity pass.
verify_layers = false'
e2e_world_start
cli="$repo/target/release/shoal"
status_json() { "$cli" status --address "$E2E_DIR/shoal.sock" --json; }

# The workload: python3 importing a set of stdlib modules.
SCRIPT='import argparse, asyncio, csv, decimal, difflib, email.parser, http.client, json, logging, pydoc, tarfile, unittest, xml.etree.ElementTree, zipfile
print("imported")'

# The image: the root filesystem as a plain tar layer in an OCI layout, and
# on top a filler layer of 16 MiB of incompressible bytes under /opt/filler
# that the script never reads (a layer outside every startup set).
layout="$E2E_DIR/py-oci"
tar -C "$ROOTFS" --numeric-owner -cf "$E2E_DIR/py.tar" .
python3 - "$layout" "$E2E_DIR/py.tar" "$E2E_DIR/filler.tar" <<'PY'
import hashlib, io, json, os, random, shutil, sys, tarfile
d, tar, filler = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(d + "/blobs/sha256")
rnd = random.Random(5)
with tarfile.open(filler, "w", format=tarfile.PAX_FORMAT) as t:
    for name in ["opt", "opt/filler"]:
        i = tarfile.TarInfo(name); i.type = tarfile.DIRTYPE; i.mode = 0o755; t.addfile(i)
    for k in range(4):
        b = rnd.randbytes(4 << 20)
        i = tarfile.TarInfo(f"opt/filler/f{k}"); i.size = len(b); i.mode = 0o644
        t.addfile(i, io.BytesIO(b))
def digest_file(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return "sha256:" + h.hexdigest()
def put(b):
    dg = "sha256:" + hashlib.sha256(b).hexdigest()
    open(f"{d}/blobs/sha256/{dg[7:]}", "wb").write(b)
    return dg
layers = []
for p in (tar, filler):
    ld = digest_file(p)
    shutil.move(p, f"{d}/blobs/sha256/{ld[7:]}")
    layers.append((ld, os.path.getsize(f"{d}/blobs/sha256/{ld[7:]}")))
cfg = json.dumps({"architecture": "amd64", "os": "linux",
                  "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["python3"]},
                  "rootfs": {"type": "layers", "diff_ids": [ld for ld, _ in layers]}}).encode()
m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(cfg), "size": len(cfg)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": size}
                           for ld, size in layers]}).encode()
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
           "digest": put(m), "size": len(m), "annotations": {"org.opencontainers.image.ref.name": "py"}}]},
          open(d + "/index.json", "w"))
open(d + "/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
PY
conv() { timeout 900 "$cli" convert -q --work-dir "$E2E_DIR" "$@"; }
if conv "oci:$layout:py" "$E2E_REGISTRY/py:plain" >/dev/null; then
  pass "python3 image converted without a profile"
else
  fail "python3 image: convert"; exit 1
fi

# Bytes and requests the registry answered for Shoal after line $1 of its log.
log_mark() { wc -l <"$E2E_DIR/logs/shoal.log"; }
log_ranges() {
  tail -n +"$(($1 + 1))" "$E2E_DIR/logs/shoal.log" | grep 'registry request' | grep 'status=206' |
    sed -n 's/.*bytes=\([0-9]*\)-\([0-9]*\).*/\1 \2/p' | awk '{ s += $2 - $1 + 1; n++ } END { print n + 0, s + 0 }'
}
run_id=0
# pull_and_run REF: Go client pull, then the script. Prepare starts each
# layer's startup prefetch; the container starts at once, and its reads of
# chunks still on their way wait for them. Sets RANGES="requests bytes"
# (Shoal's Range requests during pull and run) and WAITED=chunk bytes the
# script's reads had to fetch themselves (status fetched_on_demand: reads the
# startup set did not cover).
on_demand_bytes() { status_json | jq '[.layers[].fetched_on_demand] | add // 0'; }
pull_and_run() {
  local m out try w0
  m=$(log_mark)
  w0=$(on_demand_bytes)
  # containerd's proxy client may still be in reconnect backoff after a
  # Shoal restart: UNAVAILABLE is retried.
  for try in 1 2 3 4 5; do
    out=$("$anyclient" -address "$E2E_DIR/containerd.sock" -namespace "$E2E_NS" "$1" 2>&1) && break
    grep -q unavailable <<<"$out" || break
    sleep 1
  done
  [ -n "$out" ] && jq -e .image <<<"$out" >/dev/null 2>&1 || { fail "$1: pull" "$out"; return 1; }
  run_id=$((run_id + 1))
  out=$(E2E_CTR_TIMEOUT=300 e2e_ctr run --rm --snapshotter shoal "$1" "prof-$run_id" python3 -c "$SCRIPT" 2>&1) || true
  RANGES=$(log_ranges "$m")
  HEADS=$(tail -n +"$((m + 1))" "$E2E_DIR/logs/shoal.log" | grep 'registry request' | grep -c 'method=HEAD' || true)
  WAITED=$(($(on_demand_bytes) - w0))
  [ "$out" = imported ] || { fail "$1: script output" "$out"; return 1; }
}

ref="$E2E_REGISTRY/py:plain"
if pull_and_run "$ref"; then
  base_ranges=$RANGES base_waited=$WAITED
  pass "no profile: script ran lazily (${RANGES% *} Range requests, ${RANGES#* } bytes; reads fetched $WAITED bytes on demand)"
fi
prof="$E2E_DIR/profile.json"
if "$cli" profile show --address "$E2E_DIR/shoal.sock" --output "$prof" "$ref" 2>"$E2E_DIR/profile.err" &&
  n=$(jq '.paths | length' "$prof") && [ "$n" -gt 20 ] &&
  jq -e '.paths | index("usr/bin/python3.11") != null' "$prof" >/dev/null &&
  jq -e '[.paths[] | select(test("^usr/lib/python3.11/(json|email|asyncio)/"))] | length >= 3' "$prof" >/dev/null; then
  pass "shoal profile show: $n files in first-read order (interpreter and imported modules among them)"
else
  fail "shoal profile show" "$(cat "$E2E_DIR/profile.err"; head -c 2000 "$prof" 2>/dev/null)"
fi
if out=$(conv --json --profile "$prof" "oci:$layout:py" "$E2E_REGISTRY/py:prof") &&
  prof_summary=$out &&
  files=$(jq '.manifests[0].layers[0].startup_files' <<<"$out") && [ "$files" -gt 20 ]; then
  pass "shoal convert --profile: $files files laid out first ($(jq '.manifests[0].layers[0].startup_bytes' <<<"$out") bytes)"
else
  fail "shoal convert --profile" "${out:-}"
fi

# A fresh node: forget the first image, and restart Shoal on an empty root.
e2e_ctr image rm --sync "$ref" >/dev/null 2>&1 || true
e2e_ctr content ls -q | xargs -r -n 20 "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" content rm >/dev/null 2>&1 || true
e2e_stop_pid shoal
e2e_start shoal "$E2E_SHOAL_BIN" --root "$E2E_DIR/shoal-fresh" --address "$E2E_DIR/shoal.sock" \
  --config "$E2E_DIR/shoal-config.toml" --log-level "info,shoal=debug"
e2e_wait_for shoal "its socket" e2e_sock_ready "$E2E_DIR/shoal.sock"
for _ in $(seq 1 50); do e2e_ctr snapshots --snapshotter shoal ls >/dev/null 2>&1 && break; sleep 0.2; done

if pull_and_run "$E2E_REGISTRY/py:prof"; then
  read -r rn rb <<<"$RANGES"
  read -r bn bb <<<"${base_ranges:-0 0}"
  # The startup set is ~8 MB in one region, requested in one early request
  # beside the python layer's TOC; the filler layer's TOC is one more.
  # Reads must not fetch on demand more than 5% of what the run without a
  # profile fetched on demand.
  # Shoal's annotations give each layer's TOC position and startup-set end:
  # no blob size request (HEAD) or footer read, and the startup set is one
  # early request beside the TOC.
  if [ "$HEADS" = 0 ]; then
    pass "fresh node: TOCs fetched at their annotated positions (no HEAD, no footer read)"
  else
    fail "fresh node: annotated TOC positions" "$HEADS HEAD requests in Shoal's log"
  fi
  if [ "$rb" -gt 0 ] && [ "$rn" -le 10 ] && [ $((WAITED * 20)) -le "${base_waited:-0}" ]; then
    pass "fresh node with the profile: $rn Range requests, $rb bytes; reads fetched $WAITED bytes on demand (without a profile: $bn requests, $bb bytes, ${base_waited:-0} bytes on demand)"
  else
    fail "fresh node: startup set covers the script" "with profile: $rn requests, $rb bytes, $WAITED bytes on demand; without: $bn requests, $bb bytes, ${base_waited:-0} bytes on demand"
  fi
fi

# Strict fetch priority (remote::fetch::priority) on a third fresh node, with the
# background fetch on and no delay: the python layer's startup set goes
# first; neither the rest of that layer nor the filler layer may get a byte
# until it is in. Request start and end times come from Shoal's debug log
# ("fetched": layer, offset, len, ms, logged when the body is in).
restart_shoal() { # ROOT CONFIG
  e2e_stop_pid shoal
  e2e_start shoal "$E2E_SHOAL_BIN" --root "$1" --address "$E2E_DIR/shoal.sock" \
    --config "$2" --log-level "info,shoal=debug"
  e2e_wait_for shoal "its socket" e2e_sock_ready "$E2E_DIR/shoal.sock"
  for _ in $(seq 1 50); do e2e_ctr snapshots --snapshotter shoal ls >/dev/null 2>&1 && break; sleep 0.2; done
}
layers_local() { status_json | jq -e '.layers | length >= 2 and all(.chunks_local == .chunks_total)'; }
if [ -n "${prof_summary:-}" ]; then
  e2e_ctr image rm --sync "$E2E_REGISTRY/py:prof" >/dev/null 2>&1 || true
  e2e_ctr content ls -q | xargs -r -n 20 "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" content rm >/dev/null 2>&1 || true
  # The check reads the fetcher's per-request log lines; the identity pass
  # (which also waits its background turn) logs its windows differently.
  printf 'version = 1\n[remote]\nbackground_fetch = true\nbackground_delay_secs = 0\nverify_layers = false\n' >"$E2E_DIR/shoal-prio.toml"
  restart_shoal "$E2E_DIR/shoal-prio" "$E2E_DIR/shoal-prio.toml"
  m=$(log_mark)
  out=""
  for try in 1 2 3 4 5; do
    out=$("$anyclient" -address "$E2E_DIR/containerd.sock" -namespace "$E2E_NS" "$E2E_REGISTRY/py:prof" 2>&1) && break
    grep -q unavailable <<<"$out" || break
    sleep 1
  done
  for _ in $(seq 1 300); do layers_local >/dev/null 2>&1 && break; sleep 0.2; done
  tail -n +"$((m + 1))" "$E2E_DIR/logs/shoal.log" >"$E2E_DIR/prio.log"
  if ! layers_local >/dev/null 2>&1; then
    fail "fetch priority: both layers fully local after the background fetch" "$out$(status_json | jq -c '[.layers[] | {chunks_local, chunks_total}]')"
  elif printf '%s' "$prof_summary" >"$E2E_DIR/prof-summary.json" &&
    verdict=$(python3 - "$E2E_DIR/prio.log" "$E2E_DIR/prof-summary.json" 2>&1 <<'PY'
import json, re, sys
from datetime import datetime
summary = json.load(open(sys.argv[2]))
# Blob offset where each layer's startup set ends (0: none).
ends = {l["digest"]: l["startup_bytes"] for l in summary["manifests"][0]["layers"]}
line = re.compile(r'^(\S+)\s.*\bfetched\b.*\blayer="?(sha256:[0-9a-f]{64})"?.*\boffset=(\d+).*\blen=(\d+).*\bms=(\d+)')
startup, rest = [], []
for l in open(sys.argv[1], errors="replace"):
    mm = line.match(re.sub(r"\x1b\[[0-9;]*m", "", l))
    if not mm or mm.group(2) not in ends:
        continue
    end_t = datetime.fromisoformat(mm.group(1).replace("Z", "+00:00")).timestamp()
    start_t = end_t - int(mm.group(5)) / 1000
    off, n = int(mm.group(3)), int(mm.group(4))
    # The startup set is the chunks that start below the mark.
    (startup if off < ends[mm.group(2)] else rest).append((start_t, end_t, mm.group(2), off, n))
if not startup or not rest:
    sys.exit(f"expected startup-set and other requests; got {len(startup)} and {len(rest)}")
last_end = max(e for _, e, *_ in startup)
first = min(rest)
layers_rest = len({r[2] for r in rest})
gap_ms = (first[0] - last_end) * 1000
print(f"{len(startup)} startup-set requests, then {len(rest)} others on {layers_rest} layers; "
      f"the first other started {gap_ms:.0f} ms after the last startup-set request ended")
if gap_ms < -1 or layers_rest < 2:
    print("startup ends:", ends)
    for r in sorted(startup + rest)[:8]:
        print("  start %.3f end %.3f %s offset %d len %d %s" % (r[0], r[1], r[2][:19], r[3], r[4], "startup" if r in startup else "other"))
    sys.exit(1)
PY
  ); then
    pass "fetch priority: $verdict"
  else
    fail "fetch priority: no byte outside the startup sets before the startup sets are in" "$verdict"
  fi
fi

# shoal optimize: the same in one command (convert, pull, run, record,
# convert with the profile).
if out=$(timeout 900 "$cli" optimize -q --json --address "$E2E_DIR/shoal.sock" \
  --containerd-address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" --work-dir "$E2E_DIR" \
  "oci:$layout:py" "$E2E_REGISTRY/py:opt" -- python3 -c "$SCRIPT" 2>"$E2E_DIR/optimize.err") &&
  files=$(jq '.manifests[0].layers[0].startup_files' <<<"$out") && [ "$files" -gt 20 ] &&
  curl -sf -o /dev/null -H "Accept: application/vnd.oci.image.manifest.v1+json" "http://$E2E_REGISTRY/v2/py/manifests/opt"; then
  pass "shoal optimize: ran the script once and converted with a startup set of $files files"
else
  fail "shoal optimize" "$(tail -n 10 "$E2E_DIR/optimize.err"; head -c 1000 <<<"${out:-}")"
fi
# It leaves no trial tag in the registry and no trial image in containerd.
tags=$(curl -sf "http://$E2E_REGISTRY/v2/py/tags/list" | jq -r '.tags[]' | sort | tr '\n' ' ')
trial=$(e2e_ctr image ls -q | grep -E '/py@sha256:|unoptimized' || true)
if [ -n "$tags" ] && ! grep -q unoptimized <<<"$tags" && [ -z "$trial" ]; then
  pass "shoal optimize leaves nothing behind (registry tags of py: $tags)"
else
  fail "shoal optimize leaves nothing behind" "registry tags of py: ${tags:-?}; containerd images: $trial"
fi

#!/usr/bin/env bash
# End-to-end test of Kubernetes' path: containerd 1.6's CRI plugin with
# snapshotter = "shoal", driven by a CRI client built here
# (snapshotter/examples/cri-client.rs) with image calls THROUGH Shoal's
# image-service proxy ([cri] image_service_socket), as a kubelet pointed at it
# with --image-service-endpoint would. Needs root. Prints PASS/FAIL lines and
# ends with `cri: N passed, M failed`.
#
#   tests/e2e/cri.sh [--no-build]
#
# (--no-build still needs target/release/examples/cri-client: `cargo build
# --release -p shoal-snapshotter --example cri-client`.)
#
# World: the usual one (tests/e2e/lib.sh) plus a second docker-registry with
# htpasswd auth (bcrypt via python3's crypt) holding the private images:
# big-on:shoal and big-off:shoal (busybox + a random 32 MiB file nobody reads,
# one per run so the second is not cached either; made by `shoal convert`)
# and busybox:esgz (ctr-remote --estargz). The pause image (busybox sleeping)
# is built here and served by the open registry. CRI runs in namespace
# k8s.io with restrict_oom_score_adj (the test VM lacks CAP_SYS_RESOURCE).
# Shoal runs with background fetch off, so what was fetched is what was read,
# and with the private host in [remote] source_hosts (source_credentials).
#
# The sequence runs twice, with disable_snapshot_annotations = false and with
# containerd's default true:
#   - PullImage of the private image without credentials fails, naming 401;
#   - PullImage with credentials through the proxy; the credentials are kept
#     in ROOT/cri/credentials.json (0600);
#   - every layer of big:shoal is FUSE-mounted and containerd downloaded no
#     layer blob (both modes: Shoal's annotations need no CRI labels); the
#     eStargz image likewise with annotations on, and pulled normally (its
#     layer blobs in containerd) with the default, as documented;
#   - ImageStatus names the image; RunPodSandbox (host network, no CNI);
#     CreateContainer + StartContainer print the expected output (CRI log);
#   - ImageFsInfo through the proxy reports Shoal's root, where containerd
#     itself names <root>/io.containerd.snapshotter.v1.shoal, which does not
#     exist (containerd #10095);
#   - Shoal is restarted; the running private container then reads the
#     32 MiB file it never read before (fetched after the restart with the
#     kept credentials; the node has none) and its md5 is right;
#   - RemoveImage through the proxy forgets the credentials.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/e2e/lib.sh
source "$here/lib.sh"
e2e_simple_args "$@"

e2e_checks_begin cri

if [ "$build" = 1 ]; then
  e2e_build
  (cd "$repo" && cargo build --release -p shoal-snapshotter --example cri-client) ||
    { fail "build: cri-client example"; summary 1; exit 1; }
fi
client_bin="$repo/target/release/examples/cri-client"
cli="$repo/target/release/shoal"
[ -x "$client_bin" ] || { fail "cri-client not built (cargo build --release -p shoal-snapshotter --example cri-client)"; summary 1; exit 1; }
for tool in ctr-remote jq curl skopeo umoci; do
  command -v "$tool" >/dev/null || { fail "tools: $tool not installed (scripts/deps.sh)"; summary 1; exit 1; }
done

# CRI works in its fixed namespace.
export E2E_NS=k8s.io
E2E_EXIT_HOOK=summary
e2e_world_start
pass "world: registry $E2E_REGISTRY, containerd and shoal-snapshotter under $E2E_DIR"

# --- The private registry: htpasswd (bcrypt) auth, plain HTTP on 127.0.0.1.
user=e2e-user password="pw-$RANDOM$RANDOM"
mkdir -p "$E2E_DIR/private/data"
python3 -W ignore -c 'import crypt, sys; print(sys.argv[1] + ":" + crypt.crypt(sys.argv[2], crypt.mksalt(crypt.METHOD_BLOWFISH)))' \
  "$user" "$password" >"$E2E_DIR/private/htpasswd"
port=$(e2e_free_port)
cat >"$E2E_DIR/private/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $E2E_DIR/private/data
  delete:
    enabled: true
auth:
  htpasswd:
    realm: shoal-e2e
    path: $E2E_DIR/private/htpasswd
http:
  addr: 127.0.0.1:$port
EOF
e2e_start private-registry docker-registry serve "$E2E_DIR/private/config.yml"
PRIV=127.0.0.1:$port
# /v2/ answers 401 once it is up.
private_up() { [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$PRIV/v2/")" = 401 ]; }
e2e_wait_for private-registry "its API on $PRIV" private_up
mkdir -p "$E2E_DIR/docker"
printf '{"auths":{"%s":{"auth":"%s"}}}\n' "$PRIV" "$(printf '%s:%s' "$user" "$password" | base64 -w0)" \
  >"$E2E_DIR/docker/config.json"
if curl -sf -u "$user:$password" "http://$PRIV/v2/" >/dev/null && private_up; then
  pass "private registry $PRIV: 401 without credentials, 200 with"
else
  fail "private registry auth"
fi

# --- Images.
images="$E2E_DIR/images"
"$here/images.sh" "$images" "$E2E_REGISTRY" busybox >/dev/null 2>&1 || { fail "images: build"; exit 1; }
# pause: busybox that sleeps; in the open registry, as a node's sandbox image.
umoci config --image "$images/oci:busybox-1" --tag pause \
  --config.entrypoint /bin/sleep --config.cmd 2147483647 >/dev/null
skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$images/oci:pause" "docker://$E2E_REGISTRY/pause:1"
PRIVATE_ESGZ=$PRIV/busybox:esgz
# One Shoal-format image per run (big-on, big-off), each with its own random
# 32 MiB file, so the second run's file is not in the chunk cache either.
declare -A unused_md5
for mode in on off; do
  b="$E2E_DIR/bundle-$mode"
  umoci unpack --image "$images/oci:busybox-1" "$b" >/dev/null
  head -c $((32 << 20)) /dev/urandom >"$b/rootfs/unused.bin"
  unused_md5[$mode]=$(md5sum <"$b/rootfs/unused.bin" | cut -d' ' -f1)
  umoci repack --refresh-bundle --image "$images/oci:big-$mode" "$b" >/dev/null
  rm -rf "$b"
  skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$images/oci:big-$mode" "docker://$E2E_REGISTRY/big-$mode:1"
  if ! out=$(DOCKER_CONFIG="$E2E_DIR/docker" timeout 600 "$cli" convert -q --work-dir "$E2E_DIR" \
    "$E2E_REGISTRY/big-$mode:1" "$PRIV/big-$mode:shoal" 2>&1); then
    fail "shoal convert big-$mode:1 -> $PRIV/big-$mode:shoal" "$out"; exit 1
  fi
done
src=$(cat "$images/busybox.ref")
if e2e_ctr image pull -q --plain-http "$src" >/dev/null &&
  out=$(timeout 300 ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" \
    image convert --estargz --oci "$src" "$PRIVATE_ESGZ" 2>&1) &&
  out=$(e2e_ctr image push --plain-http --user "$user:$password" "$PRIVATE_ESGZ" 2>&1); then
  :
else
  fail "eStargz image -> $PRIVATE_ESGZ" "$out"; exit 1
fi
# Start from an empty content store.
e2e_ctr image ls -q | xargs -r -n 20 "$(command -v ctr)" --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" image rm >/dev/null
pass "images: pause:1 (open), $PRIV/big-{on,off}:shoal (shoal convert), $PRIVATE_ESGZ (eStargz) pushed"

# --- Shoal with the CRI proxy.
CRI_SOCK=$E2E_DIR/shoal-cri.sock
export E2E_SHOAL_CONFIG_TEXT="version = 1
[remote]
background_fetch = false
verify_layers = false
source_hosts = [\"$PRIV\"]
source_credentials = true
[cri]
image_service_socket = \"$CRI_SOCK\"
containerd_cri_socket = \"$E2E_DIR/containerd.sock\""
restart_shoal() {
  e2e_stop_pid shoal
  e2e_start_shoal
  e2e_wait_for shoal "its CRI socket" e2e_sock_ready "$CRI_SOCK"
  local i
  for i in $(seq 1 50); do
    e2e_ctr snapshots --snapshotter shoal ls >/dev/null 2>&1 && return 0
    sleep 0.2
  done
}
restart_shoal
status_json() { "$cli" status --address "$E2E_DIR/shoal.sock" --json; }
creds="$E2E_DIR/shoal/cri/credentials.json"

cri() { timeout 300 "$client_bin" --image-endpoint "$CRI_SOCK" --runtime-endpoint "$E2E_DIR/containerd.sock" "$@"; }

layers_of() { # REF -> layer digests, from the private registry's manifest
  local ref=$1 r tag
  r=${ref#*/}; tag=${r##*:}; r=${r%:*}
  curl -sf -u "$user:$password" -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$PRIV/v2/$r/manifests/$tag" | jq -r '.layers[].digest'
}

# lazy_check NAME REF WANT: WANT=lazy: every layer FUSE-mounted and no layer
# blob in containerd; WANT=full: every layer blob in containerd, none mounted.
lazy_check() {
  local name=$1 ref=$2 want=$3 l mounted=() downloaded=() n content
  content=$(e2e_ctr content ls -q)
  mapfile -t layers < <(layers_of "$ref")
  n=${#layers[@]}
  for l in "${layers[@]}"; do
    if grep -qF "shoal:$l " /proc/mounts; then mounted+=("$l"); fi
    if grep -qx "$l" <<<"$content"; then downloaded+=("$l"); fi
  done
  if [ "$want" = lazy ] && [ "$n" -gt 0 ] && [ ${#mounted[@]} = "$n" ] && [ ${#downloaded[@]} = 0 ]; then
    pass "$name: all $n layers mounted lazily (FUSE), no layer blob in containerd"
  elif [ "$want" = full ] && [ "$n" -gt 0 ] && [ ${#mounted[@]} = 0 ] && [ ${#downloaded[@]} = "$n" ]; then
    pass "$name: all $n layers pulled normally (no CRI labels for eStargz; documented)"
  else
    fail "$name: want $want" "layers: ${layers[*]}; FUSE-mounted: ${mounted[*]:-none}; in containerd: ${downloaded[*]:-none}"
  fi
}

# crilog FILE: the messages of a CRI log file.
crilog() { cut -d' ' -f4- "$1"; }

# wait_exited ID: until the container has exited (30 s).
wait_exited() {
  local i
  for i in $(seq 1 150); do
    cri container-status "$1" 2>/dev/null | grep -q '^state=CONTAINER_EXITED' && return 0
    sleep 0.2
  done
  return 1
}

run_sequence() {
  local ann=$1 tag out pod logs="$E2E_DIR/pods/$1"
  tag="annotations=$ann"
  PRIVATE_SHOAL=$PRIV/big-$ann:shoal
  mkdir -p "$logs"
  e2e_stop_pid containerd
  E2E_CRI=1 E2E_CRI_DISABLE_SNAPSHOT_ANNOTATIONS=$([ "$ann" = on ] && echo false || echo true) \
    E2E_CRI_PLAIN_HTTP=$PRIV e2e_start_containerd
  if grep -q "disable_snapshot_annotations = $([ "$ann" = on ] && echo false || echo true)" "$E2E_DIR/containerd/config.toml"; then
    pass "[$tag] containerd restarted with CRI on, snapshotter = \"shoal\""
  else
    fail "[$tag] containerd CRI config"; return
  fi

  # 1. Without credentials: a clear error, nothing kept.
  if out=$(cri pull "$PRIVATE_SHOAL" 2>&1); then
    fail "[$tag] pull without credentials must fail" "$out"
  elif grep -qiE '401|unauthorized' <<<"$out"; then
    pass "[$tag] pull without credentials fails: $(tail -c 200 <<<"$out")"
  else
    fail "[$tag] pull without credentials: error names no 401" "$out"
  fi

  # 2. With credentials, through the proxy.
  if out=$(cri pull "$PRIVATE_SHOAL" --user "$user" --password "$password" 2>&1); then
    pass "[$tag] PullImage $PRIVATE_SHOAL with credentials through the proxy: $out"
  else
    fail "[$tag] PullImage $PRIVATE_SHOAL" "$out"; return
  fi
  if [ "$(stat -c %a "$creds" 2>/dev/null)" = 600 ] && grep -qF "$PRIVATE_SHOAL" "$creds" && ! grep -qF "$password" "$E2E_DIR/containerd/config.toml"; then
    pass "[$tag] credentials kept for $PRIVATE_SHOAL in $creds (0600)"
  else
    fail "[$tag] credentials kept" "$(ls -l "$creds" 2>&1)"
  fi
  lazy_check "[$tag] $PRIVATE_SHOAL (Shoal format)" "$PRIVATE_SHOAL" lazy
  if out=$(cri pull "$PRIVATE_ESGZ" --user "$user" --password "$password" 2>&1); then
    pass "[$tag] PullImage $PRIVATE_ESGZ with credentials"
    lazy_check "[$tag] $PRIVATE_ESGZ (eStargz)" "$PRIVATE_ESGZ" "$([ "$ann" = on ] && echo lazy || echo full)"
  else
    fail "[$tag] PullImage $PRIVATE_ESGZ" "$out"
  fi

  # 3. ImageStatus.
  if out=$(cri status "$PRIVATE_SHOAL" 2>&1) && grep -qx "tag=$PRIVATE_SHOAL" <<<"$out" && grep -q '^id=sha256:' <<<"$out"; then
    pass "[$tag] ImageStatus: $(tr '\n' ' ' <<<"$out")"
  else
    fail "[$tag] ImageStatus" "$out"
  fi

  # 4. A pod sandbox and containers.
  if out=$(cri run-pod "cri-$ann" --log-dir "$logs" 2>&1); then
    pod=${out#pod=}
    pass "[$tag] RunPodSandbox (host network, pause from the open registry): $pod"
    pod_steps "$tag" "$pod" "$logs" "${unused_md5[$ann]}"
  else
    fail "[$tag] RunPodSandbox" "$out"
  fi
  image_steps "$tag"
}

pod_steps() {
  local tag=$1 pod=$2 logs=$3 md5=$4 out c1 c2 c3
  if out=$(cri run "$pod" hello "$PRIVATE_SHOAL" --log-dir "$logs" sh -c 'echo hello from big; stat -c %s /unused.bin' 2>&1) &&
    c1=${out#container=} && wait_exited "$c1" && [ "$(crilog "$logs/hello.log")" = "$(printf 'hello from big\n33554432')" ]; then
    pass "[$tag] CreateContainer + StartContainer ($PRIVATE_SHOAL): output right"
  else
    fail "[$tag] container output ($PRIVATE_SHOAL)" "$out; log: $(cat "$logs/hello.log" 2>&1)"
  fi
  if out=$(cri run "$pod" hello-esgz "$PRIVATE_ESGZ" --log-dir "$logs" sh -c 'echo hello from esgz; ls /bin/busybox' 2>&1) &&
    c3=${out#container=} && wait_exited "$c3" && [ "$(crilog "$logs/hello-esgz.log")" = "$(printf 'hello from esgz\n/bin/busybox')" ]; then
    pass "[$tag] CreateContainer + StartContainer ($PRIVATE_ESGZ): output right"
  else
    fail "[$tag] container output ($PRIVATE_ESGZ)" "$out; log: $(cat "$logs/hello-esgz.log" 2>&1)"
  fi
  if out=$(cri run "$pod" sleeper "$PRIVATE_SHOAL" --log-dir "$logs" sleep 100000 2>&1); then
    c2=${out#container=}
    pass "[$tag] long-running private container started: $c2"
  else
    fail "[$tag] sleeper container" "$out"
  fi

  # 6. Shoal restart; the running private container reads a file never
  #    read before.
  if [ -n "${c2:-}" ]; then
    local before after
    restart_shoal
    before=$(status_json | jq '.counters.bytes_fetched')
    if out=$(cri exec "$c2" md5sum /unused.bin 2>&1) && [ "${out%% *}" = "$md5" ]; then
      after=$(status_json | jq '.counters.bytes_fetched')
      if [ $((after - before)) -ge $((16 << 20)) ]; then
        pass "[$tag] after a Shoal restart the private container reads the uncached 32 MiB file (md5 right, $((after - before)) bytes fetched with the kept credentials)"
      else
        fail "[$tag] after restart: the file was not fetched now" "fetched $((after - before)) bytes"
      fi
    else
      fail "[$tag] after restart: md5sum /unused.bin in the running container" "$out"
    fi
  fi

  cri rm-pod "$pod" >/dev/null 2>&1 || fail "[$tag] RemovePodSandbox"
}

image_steps() {
  local tag=$1 out mp
  # 5. ImageFsInfo.
  # containerd 1.6.20 names <root>/io.containerd.snapshotter.v1.shoal,
  # which does not exist (containerd #10095); through the proxy the kubelet
  # gets Shoal's root instead, with containerd's usage figures.
  if out=$(cri fs-info 2>&1) && mp=$(sed -n 's/^image_fs=\([^ ]*\) .*/\1/p' <<<"$out" | head -n1) &&
    [ "$mp" = "$E2E_DIR/shoal" ] && [ ! -e "$E2E_DIR/containerd/root/io.containerd.snapshotter.v1.shoal" ] &&
    grep -qE '^image_fs=[^ ]+ used_bytes=[1-9]' <<<"$out"; then
    pass "[$tag] ImageFsInfo through the proxy: Shoal's root, not containerd's missing snapshotter dir: $(tr '\n' ' ' <<<"$out")"
  else
    fail "[$tag] ImageFsInfo: image filesystem is Shoal's root $E2E_DIR/shoal" "$out"
  fi
  if out=$(timeout 60 "$client_bin" --image-endpoint "$E2E_DIR/containerd.sock" fs-info 2>&1) &&
    grep -q "^image_fs=$E2E_DIR/containerd/root/io.containerd.snapshotter.v1.shoal " <<<"$out"; then
    pass "[$tag] ImageFsInfo straight from containerd names the missing dir (what the proxy fixes)"
  else
    fail "[$tag] ImageFsInfo from containerd" "$out"
  fi

  # 7. RemoveImage through the proxy.
  if cri rm "$PRIVATE_SHOAL" >/dev/null 2>&1 && cri rm "$PRIVATE_ESGZ" >/dev/null 2>&1 &&
    [ "$(cri status "$PRIVATE_SHOAL")" = absent ]; then
    if grep -qF "$PRIVATE_SHOAL" "$creds" 2>/dev/null || grep -qF "$PRIVATE_ESGZ" "$creds" 2>/dev/null; then
      fail "[$tag] RemoveImage: credentials forgotten" "$(cat "$creds")"
    else
      pass "[$tag] RemoveImage through the proxy: images gone, their credentials forgotten"
    fi
  else
    fail "[$tag] RemoveImage"
  fi
}

run_sequence on
run_sequence off

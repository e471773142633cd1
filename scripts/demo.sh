#!/usr/bin/env bash
# `make demo`: Shoal end to end in about a minute, narrated. Installs what is
# missing, builds, starts a throwaway registry + containerd + shoal-snapshotter
# under a temp dir, pushes a small image, pulls and runs it through Shoal,
# shows what happened, and removes everything it started. Needs root.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"

if [ -t 1 ]; then
  bold=$'\e[1m' dim=$'\e[2m' green=$'\e[32m' reset=$'\e[0m'
else
  bold= dim= green= reset=
fi
n=0
step() { n=$((n + 1)); printf '\n%s[%d] %s%s\n' "$bold" "$n" "$*" "$reset"; }
show() { sed 's/^/    /'; }
note() { printf '    %s%s%s\n' "$dim" "$*" "$reset"; }
now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
took() { printf '    %stook %d ms%s\n' "$green" $(($(now_ms) - $1)) "$reset"; }

[ "$(id -u)" = 0 ] || { echo "demo: run as root (containerd and overlay mounts need it)" >&2; exit 1; }

step "Packages (containerd, runc, docker-registry, skopeo, umoci, stargz-snapshotter, ...)"
"$repo/scripts/deps.sh" 2>&1 | show

step "Build shoal-snapshotter and shoal (cargo build --release)"
t=$(now_ms)
(cd "$repo" && cargo build --release --bins 2>&1 | tail -n 3 | show)
"$repo/target/release/shoal" version 2>&1 | show || true
took "$t"

# shellcheck source=tests/e2e/lib.sh
source "$repo/tests/e2e/lib.sh"

# Fetch only what containers read, so the demo can show it; by default Shoal
# also fetches the rest of a lazy layer in the background.
E2E_SHOAL_CONFIG_TEXT='version = 1
[remote]
background_fetch = false'

step "Start a throwaway world: shoal-snapshotter, docker-registry, containerd"
t=$(now_ms)
e2e_world_start
took "$t"
cat <<EOF | show
everything lives in   $E2E_DIR
shoal-snapshotter     --root $E2E_DIR/shoal --address $E2E_DIR/shoal.sock
                      --config $E2E_DIR/shoal-config.toml ([remote] background_fetch = false,
                      so you can see below what was fetched on demand)
containerd            $E2E_DIR/containerd/config.toml, which registers Shoal as:
EOF
sed -n '/^\[proxy_plugins.shoal\]/,/address/p' "$E2E_DIR/containerd/config.toml" | sed 's/^/      /' | show
note "registry on http://$E2E_REGISTRY"

step "Build a one-layer busybox image with umoci and push it with skopeo"
t=$(now_ms)
"$repo/tests/e2e/images.sh" "$E2E_DIR/images" "$E2E_REGISTRY" busybox 2>&1 | show
ref=$(cat "$E2E_DIR/images/busybox.ref")
took "$t"
note "pushed $ref"

step "Pull it through Shoal (plain layers): ctr image pull --snapshotter shoal $ref"
t=$(now_ms)
e2e_ctr image pull --plain-http --snapshotter shoal "$ref" 2>&1 | grep -E '^(unpacking|done)' | show
took "$t"
note "a plain gzip layer cannot be read lazily, so containerd fetched it and unpacked"
note "it into a snapshot Shoal prepared (the fallback path);"
note "the committed layer is now one of Shoal's snapshots:"
e2e_ctr snapshots --snapshotter shoal ls 2>&1 | show

step "Run a container on it: ctr run --rm --snapshotter shoal"
t=$(now_ms)
e2e_ctr run --rm --snapshotter shoal "$ref" demo-hello \
  sh -c 'echo "hello from a container whose rootfs Shoal serves"; uname -sr; ls /bin | wc -l | sed "s/^/applets: /"' 2>&1 | show
took "$t"

step "Start a long-running container and look at its mounts"
e2e_ctr run -d --snapshotter shoal "$ref" demo-sleeper sleep 600 >/dev/null
note "snapshots now (the container's writable layer is the Active one):"
e2e_ctr snapshots --snapshotter shoal ls 2>&1 | show
note "the container's root filesystem, as mounted on the host (overlay over Shoal's dirs):"
awk -v state="$E2E_DIR/containerd/state/" '
  index($5, state) == 1 {
    for (i = 7; i <= NF; i++) if ($i == "-") break
    print $5 "  (" $(i + 1) ")"
    n = split($(i + 3), opts, ",")
    for (j = 1; j <= n; j++) {
      split(opts[j], kv, "=")
      if (kv[1] == "lowerdir") { m = split(kv[2], dirs, ":"); for (k = 1; k <= m; k++) print "  lowerdir " dirs[k] }
      else if (kv[1] == "upperdir" || kv[1] == "workdir") print "  " kv[1] " " kv[2]
    }
  }' /proc/self/mountinfo | show
note "inside it:"
e2e_ctr task exec --exec-id demo-ps demo-sleeper sh -c 'echo "pid 1 is: $(cat /proc/1/cmdline | tr "\0" " ")"; df -h / | tail -n 1' 2>&1 | show
e2e_ctr task kill -s SIGKILL demo-sleeper >/dev/null
for _ in $(seq 1 50); do
  e2e_ctr task ls 2>/dev/null | grep -q 'demo-sleeper.*STOPPED' && break
  sleep 0.1
done
e2e_ctr task rm -f demo-sleeper >/dev/null 2>&1 || true
e2e_ctr container rm demo-sleeper >/dev/null
note "stopped and removed; its Active snapshot is gone again:"
e2e_ctr snapshots --snapshotter shoal ls 2>&1 | show

step "Lazy pulling: an image with a 32 MiB file, converted to eStargz by ctr-remote"
t=$(now_ms)
"$repo/tests/e2e/images.sh" "$E2E_DIR/images" "$E2E_REGISTRY" big 2>&1 | show
src=$(cat "$E2E_DIR/images/big.ref")
lazy="$src-estargz"
e2e_ctr image pull -q --plain-http "$src" >/dev/null
timeout 300 ctr-remote --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" \
  image convert --estargz --oci "$src" "$lazy" >/dev/null
e2e_ctr image push -q --plain-http "$lazy" >/dev/null 2>&1 || e2e_ctr image push --plain-http "$lazy" >/dev/null
# Forget both locally (and garbage-collect their blobs): the pull below must
# go to the registry.
e2e_ctr image rm --sync "$src" "$lazy" >/dev/null
took "$t"
note "pushed $lazy (eStargz: still a valid tar.gz, plus a table of contents"
note "with a sha256 for every chunk)"

step "shoal pull $lazy"
t=$(now_ms)
"$repo/target/release/shoal" pull --containerd-address "$E2E_DIR/containerd.sock" \
  --namespace "$E2E_NS" "$lazy" 2>&1 | show
took "$t"
note "the layers are mounted through FUSE, and nothing but their tables of contents was fetched:"
grep -F ' fuse ' /proc/mounts | awk -v d="$E2E_DIR/shoal/" 'index($2, d) == 1 { print $1 "  on  " $2 }' | show

step "Run it right away: the container reads busybox, never the 32 MiB file"
t=$(now_ms)
e2e_ctr run --rm --snapshotter shoal "$lazy" demo-lazy sh -c 'echo "hello from a lazily pulled image"' 2>&1 | show
took "$t"
note "what Shoal fetched on demand (shoal status; with the default config the rest"
note "would now be arriving in the background):"
"$repo/target/release/shoal" status --address "$E2E_DIR/shoal.sock" 2>&1 | show

step "What containerd asked Shoal (gRPC calls in $E2E_DIR/logs/shoal.log)"
plain_log() { sed 's/\x1b\[[0-9;]*m//g' "$E2E_DIR/logs/shoal.log"; }
plain_log | grep -oE 'op="[a-z_]+"' | sort | uniq -c | sort -rn |
  awk '{ gsub(/op=|"/, "", $2); printf "%5d x %s\n", $1, $2 }' | show
note "last calls:"
plain_log | grep -E 'shoal::grpc' | tail -n 6 | sed -E 's/^([^ ]+) +[A-Z]+ +shoal::grpc: /\1 /' | cut -c1-150 | show

step "Clean up: stop what the demo started, unmount, remove $E2E_DIR"
e2e_cleanup 0
printf '\n%sDemo done.%s Next: make test (unit, conformance and end-to-end tests).\n' "$bold" "$reset"

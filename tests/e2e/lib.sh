# shellcheck shell=bash
# Throwaway test world for Shoal's end-to-end tests and demo: a private
# docker-registry, a private containerd and (optionally) shoal-snapshotter, all
# under one temp dir. Source this file, then call e2e_world_start.
#
# Invariants:
# - Everything the world creates lives under $E2E_DIR: sockets, roots, logs,
#   registry storage. Nothing touches the system containerd (/run/containerd
#   holds only the shim sockets that containerd itself hashes there).
# - Cleanup ends only the PIDs started here, by pid, and unmounts only mount
#   points under $E2E_DIR, deepest first.
#
# Knobs (environment):
#   E2E_SHOAL_BIN  path to shoal-snapshotter; empty string = run without Shoal
#   E2E_NS         containerd namespace (default shoal-e2e-<temp dir suffix>;
#                  unique, because runc state and cgroups are shared by name)
#   E2E_SHOAL_CONFIG_TEXT  if set, written to $E2E_DIR/shoal-config.toml and
#                  passed to shoal-snapshotter with --config
#   E2E_KEEP=1     keep $E2E_DIR after the run (processes are still stopped)
#   E2E_QUIET=1    don't print log tails on failure
#   E2E_TIMEOUT    seconds to wait for each daemon to come up (default 30)
#   E2E_EXTRA_PROXY_PLUGINS  TOML appended to containerd's config (more
#                  [proxy_plugins.NAME], e.g. the benchmark's stargz)
#   E2E_CRI=1      enable containerd's CRI plugin (off by default) with
#                  snapshotter = "shoal", plain HTTP to $E2E_REGISTRY and to
#                  E2E_CRI_PLAIN_HTTP (space-separated host:port), no CNI
#                  (host-network pods only), a random stream server port;
#                  E2E_CRI_DISABLE_SNAPSHOT_ANNOTATIONS (default true, as
#                  containerd's) and E2E_CRI_SANDBOX_IMAGE are passed through
#   E2E_EXIT_HOOK  name of a function the EXIT trap calls, with the exit
#                  status, after cleanup (run.sh prints its summary there)

E2E_TIMEOUT=${E2E_TIMEOUT:-30}
E2E_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
E2E_REPO_ROOT=$(cd "$E2E_LIB_DIR/../.." && pwd)
: "${E2E_SHOAL_BIN=$E2E_REPO_ROOT/target/release/shoal-snapshotter}"

E2E_DIR=
E2E_PIDS=()      # "name:pid" of every daemon started here, in start order
E2E_CLEANED=0

e2e_say() { printf '%s\n' "$*" >&2; }

# e2e_die MSG: print MSG and exit non-zero (the EXIT trap cleans up).
e2e_die() {
  e2e_say "e2e: error: $*"
  exit 1
}

# e2e_ctr ARGS...: ctr against the private containerd, in the test namespace,
# killed after E2E_CTR_TIMEOUT seconds (default 300) so a hang fails the test.
e2e_ctr() {
  timeout "${E2E_CTR_TIMEOUT:-300}" \
    ctr --address "$E2E_DIR/containerd.sock" --namespace "$E2E_NS" "$@"
}

# e2e_tail_log NAME: the last lines of a daemon's log, indented.
e2e_tail_log() {
  local f="$E2E_DIR/logs/$1.log"
  [ -f "$f" ] || return 0
  e2e_say "----- last lines of $f -----"
  tail -n "${2:-40}" "$f" | sed 's/^/  | /' >&2
}

e2e_pid_of() {
  local entry
  for entry in "${E2E_PIDS[@]}"; do
    [ "${entry%%:*}" = "$1" ] && { echo "${entry#*:}"; return 0; }
  done
  return 1
}

# e2e_wait_for NAME DESCRIPTION CHECK-COMMAND...: poll CHECK until it succeeds,
# the daemon NAME exits, or E2E_TIMEOUT passes. Fails with the log tail.
e2e_wait_for() {
  local name=$1 what=$2 pid deadline
  shift 2
  pid=$(e2e_pid_of "$name") || e2e_die "no pid recorded for $name"
  deadline=$((SECONDS + E2E_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      e2e_tail_log "$name"
      e2e_die "$name (pid $pid) exited before $what"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      e2e_tail_log "$name"
      e2e_die "$name (pid $pid): timed out after ${E2E_TIMEOUT}s waiting for $what"
    fi
    sleep 0.1
  done
}

# e2e_start NAME CMD...: start a daemon in the background, appending to
# $E2E_DIR/logs/NAME.log (a restart keeps the history), and record its pid.
e2e_start() {
  local name=$1
  shift
  "$@" >>"$E2E_DIR/logs/$name.log" 2>&1 </dev/null &
  E2E_PIDS+=("$name:$!")
}

# e2e_free_port: a TCP port on 127.0.0.1 that nothing listens on right now.
e2e_free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 40000))
    if [ -z "$(ss -Hltn "sport = :$p" 2>/dev/null)" ]; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

# e2e_http_ok PORT PATH: true if GET http://127.0.0.1:PORT/PATH answers 200.
e2e_http_ok() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
    IFS= read -r -t 5 status <&3 || exit 1
    case $status in *" 200 "*) exit 0 ;; *) exit 1 ;; esac
  ) 2>/dev/null
}

e2e_sock_ready() { [ -S "$1" ]; }

e2e_start_registry() {
  local port tries=0
  mkdir -p "$E2E_DIR/registry/data"
  while :; do
    port=$(e2e_free_port) || e2e_die "no free TCP port found"
    cat >"$E2E_DIR/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $E2E_DIR/registry/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
    e2e_start registry docker-registry serve "$E2E_DIR/registry/config.yml"
    # The port may have been taken between the check and the bind: retry.
    local deadline=$((SECONDS + E2E_TIMEOUT)) pid
    pid=$(e2e_pid_of registry)
    until e2e_http_ok "$port" /v2/; do
      kill -0 "$pid" 2>/dev/null || break
      [ "$SECONDS" -lt "$deadline" ] || break
      sleep 0.1
    done
    if e2e_http_ok "$port" /v2/; then
      break
    fi
    tries=$((tries + 1))
    e2e_stop_pid registry
    if [ "$tries" -ge 3 ]; then
      e2e_tail_log registry
      e2e_die "docker-registry did not come up on 127.0.0.1:$port"
    fi
  done
  E2E_REGISTRY="127.0.0.1:$port"
  export E2E_REGISTRY
}

e2e_start_shoal() {
  [ -n "$E2E_SHOAL_BIN" ] || return 0
  [ -x "$E2E_SHOAL_BIN" ] || e2e_die "shoal-snapshotter not found at $E2E_SHOAL_BIN (run: cargo build --release --bins)"
  mkdir -p "$E2E_DIR/shoal"
  # A socket left by a daemon we stopped (or SIGKILLed) would pass the
  # readiness check below before the new daemon listens.
  e2e_pid_of shoal >/dev/null || rm -f "$E2E_DIR/shoal.sock"
  local config=()
  if [ -n "${E2E_SHOAL_CONFIG_TEXT:-}" ]; then
    printf '%s\n' "$E2E_SHOAL_CONFIG_TEXT" >"$E2E_DIR/shoal-config.toml"
    config=(--config "$E2E_DIR/shoal-config.toml")
  fi
  e2e_start shoal "$E2E_SHOAL_BIN" --root "$E2E_DIR/shoal" --address "$E2E_DIR/shoal.sock" \
    "${config[@]}" --log-level "${E2E_SHOAL_LOG_LEVEL:-info,shoal=debug}"
  e2e_wait_for shoal "its socket $E2E_DIR/shoal.sock" e2e_sock_ready "$E2E_DIR/shoal.sock"
}

# e2e_cri_config: the CRI plugin's section of containerd's config (E2E_CRI=1).
e2e_cri_config() {
  local cri='plugins."io.containerd.grpc.v1.cri"' host
  mkdir -p "$E2E_DIR/cni/bin" "$E2E_DIR/cni/net.d"
  cat <<EOF
[$cri]
  sandbox_image = "${E2E_CRI_SANDBOX_IMAGE:-$E2E_REGISTRY/pause:1}"
  stream_server_port = "0"
  enable_selinux = false
  # The sandbox's -998 needs CAP_SYS_RESOURCE, which a test VM may lack.
  restrict_oom_score_adj = true
  [$cri.containerd]
    snapshotter = "shoal"
    disable_snapshot_annotations = ${E2E_CRI_DISABLE_SNAPSHOT_ANNOTATIONS:-true}
    default_runtime_name = "runc"
    [$cri.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [$cri.cni]
    bin_dir = "$E2E_DIR/cni/bin"
    conf_dir = "$E2E_DIR/cni/net.d"
EOF
  for host in $E2E_REGISTRY ${E2E_CRI_PLAIN_HTTP:-}; do
    printf '  [%s.registry.mirrors."%s"]\n    endpoint = ["http://%s"]\n' "$cri" "$host" "$host"
  done
}

e2e_start_containerd() {
  mkdir -p "$E2E_DIR/containerd/root" "$E2E_DIR/containerd/state"
  local proxy=
  if [ -n "$E2E_SHOAL_BIN" ]; then
    proxy="[proxy_plugins.shoal]
  type = \"snapshot\"
  address = \"$E2E_DIR/shoal.sock\""
  fi
  local cri_off='"io.containerd.grpc.v1.cri",' cri=
  if [ "${E2E_CRI:-0}" = 1 ]; then
    cri_off=
    cri=$(e2e_cri_config)
  fi
  cat >"$E2E_DIR/containerd/config.toml" <<EOF
version = 2
root = "$E2E_DIR/containerd/root"
state = "$E2E_DIR/containerd/state"
disabled_plugins = [
  $cri_off
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "$E2E_DIR/containerd.sock"

[debug]
  level = "info"

$proxy
${E2E_EXTRA_PROXY_PLUGINS:-}
$cri
EOF
  e2e_start containerd containerd --config "$E2E_DIR/containerd/config.toml"
  e2e_wait_for containerd "its API on $E2E_DIR/containerd.sock" \
    ctr --address "$E2E_DIR/containerd.sock" version
}

# e2e_world_start: registry + shoal-snapshotter + containerd under a new temp
# dir; sets E2E_DIR and E2E_REGISTRY and installs the cleanup trap.
e2e_world_start() {
  [ "$(id -u)" = 0 ] || e2e_die "must run as root (containerd and overlay mounts)"
  E2E_DIR=$(mktemp -d "${TMPDIR:-/tmp}/shoal-e2e.XXXXXX")
  local suffix=${E2E_DIR##*.}
  E2E_NS=${E2E_NS:-shoal-e2e-${suffix,,}}
  export E2E_DIR E2E_NS
  mkdir -p "$E2E_DIR/logs"
  trap 'e2e_cleanup "$?"; exit "$?"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  e2e_start_shoal
  e2e_start_registry
  e2e_start_containerd
}

# e2e_stop_pid NAME: SIGTERM the daemon NAME, SIGKILL after 10 s.
e2e_stop_pid() {
  local pid i
  pid=$(e2e_pid_of "$1") || return 0
  if kill -0 "$pid" 2>/dev/null; then
    # It may exit (and bash reap it, e.g. right after a kill -9) between
    # two of these calls: a kill that finds no process is not an error.
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      e2e_say "e2e: $1 (pid $pid) ignored SIGTERM for 10s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
  local kept=() entry
  for entry in "${E2E_PIDS[@]}"; do
    [ "${entry%%:*}" = "$1" ] || kept+=("$entry")
  done
  E2E_PIDS=("${kept[@]}")
}

# e2e_stop_fdholder [ROOT]: end the shoal-fdholder that our shoal-snapshotter
# started for ROOT (default: every root directly under $E2E_DIR; it outlives
# the daemon by design), by the pid it wrote, only if that pid is a
# shoal-fdholder. Its kept FUSE fds close, so the mounts they served can then
# be unmounted.
e2e_stop_fdholder() {
  local pidfile pid i pidfiles
  if [ $# -gt 0 ]; then pidfiles=("$1/fdholder.pid"); else pidfiles=("$E2E_DIR"/*/fdholder.pid); fi
  for pidfile in "${pidfiles[@]}"; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile" 2>/dev/null) || continue
    case $(cat "/proc/$pid/comm" 2>/dev/null) in shoal-fdholder) ;; *) continue ;; esac
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    rm -f "$pidfile"
  done
}

# e2e_mounts_under DIR: mount points at or below DIR, deepest first.
e2e_mounts_under() {
  local mp
  # Field 5 of mountinfo is the mount point, with octal escapes (\040).
  while read -r _ _ _ _ mp _; do
    mp=$(printf '%b' "$mp")
    case $mp in "$1" | "$1"/*) printf '%s\n' "$mp" ;; esac
  done </proc/self/mountinfo | awk '{ print length($0) "\t" $0 }' | sort -rn -k1,1 | cut -f2-
}

e2e_unmount_all_under() {
  local dir=$1 round mp left
  for round in 1 2 3 4 5; do
    left=$(e2e_mounts_under "$dir")
    [ -n "$left" ] || return 0
    while IFS= read -r mp; do
      umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
    done <<<"$left"
  done
  left=$(e2e_mounts_under "$dir")
  [ -z "$left" ] || e2e_say "e2e: warning: still mounted under $dir: $left"
}

# Stop containers the test left behind, through containerd itself, so the
# shims (which containerd started, not us) exit and release their mounts.
e2e_stop_leftover_tasks() {
  [ -S "$E2E_DIR/containerd.sock" ] || return 0
  local id
  local E2E_CTR_TIMEOUT=10
  for id in $(e2e_ctr tasks ls -q 2>/dev/null); do
    e2e_ctr tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    e2e_ctr tasks rm -f "$id" >/dev/null 2>&1 || true
  done
  for id in $(e2e_ctr containers ls -q 2>/dev/null); do
    e2e_ctr containers rm "$id" >/dev/null 2>&1 || true
  done
}

# e2e_cleanup [STATUS]: the EXIT trap. Idempotent.
e2e_cleanup() {
  local status=${1:-0} name
  [ "$E2E_CLEANED" = 1 ] && return 0
  E2E_CLEANED=1
  trap - EXIT INT TERM
  [ -n "$E2E_DIR" ] || return 0
  if [ "$status" != 0 ] && [ "${E2E_QUIET:-0}" != 1 ]; then
    for name in shoal containerd registry; do e2e_tail_log "$name" 30; done
  fi
  # Only if containerd is still ours and alive.
  if e2e_pid_of containerd >/dev/null; then e2e_stop_leftover_tasks; fi
  for name in containerd shoal registry; do e2e_stop_pid "$name"; done
  e2e_stop_fdholder
  # Anything else a script started with e2e_start (e.g. faults.sh's proxy).
  local entry
  for entry in "${E2E_PIDS[@]}"; do e2e_stop_pid "${entry%%:*}"; done
  e2e_unmount_all_under "$E2E_DIR"
  # What runc made for our namespace outside $E2E_DIR, if now empty.
  rmdir "/sys/fs/cgroup/$E2E_NS" "/run/containerd/runc/$E2E_NS" 2>/dev/null || true
  if [ "${E2E_KEEP:-0}" = 1 ] || [ -n "$(e2e_mounts_under "$E2E_DIR")" ]; then
    e2e_say "e2e: kept $E2E_DIR"
  else
    rm -rf --one-file-system "$E2E_DIR"
  fi
  if [ -n "${E2E_EXIT_HOOK:-}" ]; then "$E2E_EXIT_HOOK" "$status" || status=$?; fi
  return "$status"
}

# ---------------------------------------------------------------------------
# Tree dumps: what a container (or a host directory) sees, one line per path.

# e2e_tools_dir: a directory holding a static busybox and tree.sh, to be
# bind-mounted read-only into containers at /.e2e-tools.
e2e_tools_dir() {
  local d="$E2E_DIR/tools"
  if [ ! -x "$d/busybox" ]; then
    mkdir -p "$d"
    cp /bin/busybox "$d/busybox"
    cp "$E2E_LIB_DIR/tree.sh" "$d/tree.sh"
  fi
  echo "$d"
}

# e2e_tree_normalize: raw tree.sh output on stdin -> sorted dump on stdout.
# Inode numbers differ between filesystems, so hardlinks are grouped by the
# first path (in sort order) that shares the inode. A directory's link count
# is a property of the filesystem (overlayfs reports 1 for merged dirs), so
# it is left out.
e2e_tree_normalize() {
  LC_ALL=C sort -t "$(printf '\t')" -k3,3 |
    awk -F '\t' 'BEGIN { OFS = "\t" }
      {
        ino = $1; nlink = $2; $1 = ""; $2 = ""
        group = "-"
        if ($4 == "directory") nlink = "-"
        else if (nlink > 1) {
          if (!(ino in first)) first[ino] = $3
          group = "hardlink-group=" first[ino]
        }
        print substr($0, 3), "nlink=" nlink, group
      }'
}

# e2e_tree_host DIR: dump a host directory (e.g. an umoci-unpacked rootfs).
e2e_tree_host() {
  (cd "$1" && BB=/bin/busybox /bin/busybox sh "$E2E_LIB_DIR/tree.sh") | e2e_tree_normalize
}

# e2e_tree_container SNAPSHOTTER IMAGE ID: dump what a container sees.
e2e_tree_container() {
  local tools
  tools=$(e2e_tools_dir)
  e2e_ctr run --rm --snapshotter "$1" \
    --mount "type=bind,src=$tools,dst=/.e2e-tools,options=rbind:ro" \
    "$2" "$3" /.e2e-tools/busybox sh -c 'cd / && exec /.e2e-tools/busybox sh /.e2e-tools/tree.sh' |
    e2e_tree_normalize
}

# ---------------------------------------------------------------------------
# Reporting, shared by run.sh, lazy.sh, pull.sh and faults.sh.

# e2e_checks_begin NAME: start counting; the summary line is
# `NAME: N passed, M failed (Ts)`. `pass MSG`, `fail MSG [DETAIL]`, and
# `summary STATUS` (also usable as E2E_EXIT_HOOK) report.
# e2e_simple_args "$@": the arguments of a test script that takes only
# --no-build (sets build=0; build=1 otherwise) and --help (prints the
# script's header comment, line 2 up to `set -euo pipefail`).
e2e_simple_args() {
  local arg
  build=1
  for arg in "$@"; do
    case $arg in
      --no-build) build=0 ;;
      -h | --help) sed -n '2,/^set -euo pipefail$/{/^set -euo pipefail$/!p}' "$0"; exit 0 ;;
      *) echo "$(basename "$0"): unknown argument $arg" >&2; exit 2 ;;
    esac
  done
}

e2e_checks_begin() {
  E2E_REPORT=$1 passed=0 failed=0 failed_names=() started=$SECONDS
}

pass() { passed=$((passed + 1)); printf 'PASS  %s\n' "$1"; }

fail() {
  failed=$((failed + 1)); failed_names+=("$1")
  printf 'FAIL  %s\n' "$1"
  [ $# -lt 2 ] || printf '%s\n' "$2" | sed 's/^/      /'
}

summary() {
  local status=$1
  if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
    fail "run aborted (exit $status)"
  fi
  echo
  [ "$failed" -eq 0 ] || printf 'failed: %s\n' "${failed_names[*]}"
  printf '%s: %d passed, %d failed (%ds)\n' "$E2E_REPORT" "$passed" "$failed" "$((SECONDS - started))"
  [ "$failed" -eq 0 ]
}

# e2e_build: cargo build --release --bins at the repository root, reported as
# a check; on failure, print the summary and exit.
e2e_build() {
  export PATH="$HOME/.cargo/bin:$PATH"
  if (cd "$E2E_REPO_ROOT" && cargo build --release --bins); then
    pass "build: cargo build --release --bins"
  else
    fail "build: cargo build --release --bins"
    summary 1
    exit 1
  fi
}

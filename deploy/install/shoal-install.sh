#!/bin/bash
# Puts Shoal on a node's host (not in a pod: containerd would need Shoal to
# start Shoal's own pod, Dragonfly helm-charts #387), or takes it off again.
#
#   shoal-install.sh install|uninstall [--root DIR] [--from DIR]
#                    [--containerd-config PATH] [--no-restart]
#
# --root DIR     the host's / as seen here (default /; /host in the
#                installer DaemonSet, a scratch directory in tests)
# --from DIR     where the files come from (default: this script's
#                directory): shoal-snapshotter, shoal, shoal-fdholder
#                (optional), shoal-snapshotter.service, config.toml (optional)
# --containerd-config PATH   on the host (default /etc/containerd/config.toml)
# --no-restart   change files only; restart nothing
#
# install copies the binaries to /usr/local/bin, the unit to
# /etc/systemd/system and config.toml to /etc/shoal, and registers Shoal in
# containerd's config (containerd_patch.py: config version 2 or 3). Every
# file it replaces is first kept under /var/lib/shoal-install/backup, once.
# The containerd config is copied, the copy edited, and the result written
# back into the same file (not renamed over it: it may be a bind mount, where
# sed -i and rename fail). Running install again changes nothing and
# restarts nothing. Services are restarted on the host through
# `nsenter -t 1 -m -u -i -n -p systemctl` (needs hostPID and privileges);
# SHOAL_INSTALL_HOST_EXEC replaces that prefix (tests set it to a logger).
#
# uninstall puts every kept file back byte for byte (containerd's config
# included), removes the files install added, restarts containerd and stops
# Shoal. A file changed since install wrote it is first copied to
# PATH.before-shoal-uninstall, so an operator's later edit is not lost. Drain the node first: containers on Shoal's snapshots lose their
# root filesystems.
set -euo pipefail

usage() { sed -n '4,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "shoal-install: $*" >&2; exit 1; }

action=${1:-}; [[ $action == install || $action == uninstall ]] || usage
shift
root=/ from=$(cd "$(dirname "$0")" && pwd) ctr_config=/etc/containerd/config.toml restart=1
while (($#)); do
  case $1 in
    --root) root=${2:?}; shift 2 ;;
    --from) from=${2:?}; shift 2 ;;
    --containerd-config) ctr_config=${2:?}; shift 2 ;;
    --no-restart) restart=0; shift ;;
    *) usage ;;
  esac
done
root=${root%/}
[[ -d $root/ ]] || die "--root $root: not a directory"
read -r -a host_exec <<<"${SHOAL_INSTALL_HOST_EXEC:-nsenter -t 1 -m -u -i -n -p}"
state=$root/var/lib/shoal-install
backup=$state/backup
list=$state/installed   # host paths install wrote, one a line
patcher=$(dirname "$0")/containerd_patch.py
changed_unit=0 changed_bin=0 changed_ctr=0

host() { ((restart)) || return 0; echo "shoal-install: systemctl $*"; "${host_exec[@]}" systemctl "$@"; }

# Writes $1 (a local file) to host path $2 with mode $3, keeping what was
# there before; returns 1 if the content was already the same. With $4 =
# in-place the file keeps its inode (a bind-mounted config file cannot be
# renamed over); otherwise a new file is renamed over it (a running binary
# cannot be written: ETXTBSY).
put() {
  local src=$1 dst=$root$2 mode=$3 how=${4:-rename}
  if [[ -f $dst ]] && cmp -s "$src" "$dst"; then return 1; fi
  mkdir -p "$state" "$(dirname "$dst")"
  grep -qxF -- "$2" "$list" 2>/dev/null || {
    if [[ -e $dst ]]; then mkdir -p "$(dirname "$backup$2")"; cp -p "$dst" "$backup$2"; fi
    echo "$2" >>"$list"
  }
  mkdir -p "$(dirname "$state/written$2")"; sha256sum <"$src" >"$state/written$2"
  if [[ -e $dst && $how == in-place ]]; then
    cat "$src" >"$dst"
    chmod "$mode" "$dst"
  else
    install -m "$mode" "$src" "$dst.shoal-new" && mv "$dst.shoal-new" "$dst"
  fi
  echo "shoal-install: wrote $2"
}

install_all() {
  [[ -f $root$ctr_config ]] || die "$ctr_config: no such file on the host (write one with \`containerd config default\`, then run again)"
  command -v python3 >/dev/null || die "python3 is needed to edit $ctr_config"
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  # Check containerd's config before touching anything.
  cp "$root$ctr_config" "$tmp/config.toml"
  python3 "$patcher" "$tmp/config.toml" "$tmp/config.new" || die "$ctr_config left unchanged"
  for b in shoal-snapshotter shoal shoal-fdholder; do
    if [[ -f $from/$b ]]; then
      put "$from/$b" "/usr/local/bin/$b" 0755 && changed_bin=1
    elif [[ $b != shoal-fdholder ]]; then
      die "$from/$b: missing"
    fi
  done
  [[ -f $from/shoal-snapshotter.service ]] || die "$from/shoal-snapshotter.service: missing"
  put "$from/shoal-snapshotter.service" /etc/systemd/system/shoal-snapshotter.service 0644 && changed_unit=1
  if [[ -f $from/config.toml ]]; then
    put "$from/config.toml" /etc/shoal/config.toml 0644 && changed_bin=1
  fi
  mkdir -p "$state"; echo "$ctr_config" >"$state/containerd-config"
  put "$tmp/config.new" "$ctr_config" "$(stat -c %a "$root$ctr_config")" in-place && changed_ctr=1
  if ((changed_unit)); then host daemon-reload; fi
  if ((changed_unit || changed_bin)); then
    host enable shoal-snapshotter.service
    host restart shoal-snapshotter.service
  fi
  if ((changed_ctr)); then host restart containerd.service; fi
  ((changed_unit || changed_bin || changed_ctr)) || echo "shoal-install: already installed, nothing changed"
}

uninstall_all() {
  [[ -f $list ]] || { echo "shoal-install: not installed here (no $list)"; return 0; }
  local p restored_ctr=0
  ctr_config=$(cat "$state/containerd-config" 2>/dev/null || echo "$ctr_config")
  while read -r p; do
    # Changed since install wrote it (an operator's edit): keep that too.
    if [[ -e $root$p ]] && [[ $(sha256sum <"$root$p") != "$(cat "$state/written$p")" ]]; then
      cp -p "$root$p" "$root$p.before-shoal-uninstall"
      echo "shoal-install: $p was changed after install; that version is kept as $p.before-shoal-uninstall" >&2
    fi
    if [[ -e $backup$p ]]; then
      if [[ $p == "$ctr_config" ]]; then   # in place, as install wrote it
        cat "$backup$p" >"$root$p"
        chmod --reference="$backup$p" "$root$p"
      else                                  # the old binary may be running
        cp -p "$backup$p" "$root$p.shoal-old" && mv "$root$p.shoal-old" "$root$p"
      fi
      echo "shoal-install: restored $p"
    else
      rm -f "$root$p"
      echo "shoal-install: removed $p"
    fi
    [[ $p == "$ctr_config" ]] && restored_ctr=1
  done <"$list"
  ((restored_ctr)) && host restart containerd.service
  host disable --now shoal-snapshotter.service
  host daemon-reload
  rm -rf "$state"
}

"${action}_all"

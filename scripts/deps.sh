#!/usr/bin/env bash
# Installs the Debian 12 packages that Shoal's tests and demo need. Idempotent:
# asks dpkg first and runs apt-get only when something is missing. Needs root
# when it has something to install. Rust itself is not installed here.
set -euo pipefail

packages=(
  containerd runc            # the container runtime Shoal plugs into
  docker-registry skopeo     # the throwaway registry and image upload
  umoci busybox-static       # building test images
  stargz-snapshotter         # ctr-remote: eStargz and zstd:chunked images
  curl bc debootstrap        # registry queries, arithmetic, bench images
  fuse3 iproute2 jq          # FUSE mounts, netns/qdisc and ss, JSON
  golang-go golang-github-containerd-containerd-dev  # conformance suite
  systemd                    # systemd-analyze verify for the unit file
  strace                     # daemon.rs: the directory fsyncs of a Prepare
  ca-certificates git build-essential pkg-config  # what cargo builds need
  protobuf-compiler          # protoc for containerd-client's build script
  python3 python3-yaml python3-venv  # tests/deploy: manifest and schema checks; cri.sh (htpasswd hash)
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: all ${#packages[@]} packages present"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "deps: missing ${missing[*]}; run as root to install them" >&2
  exit 1
fi

echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "deps: done"

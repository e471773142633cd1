#!/usr/bin/env bash
# Builds tests/e2e/anyclient (GOPATH mode over Debian's containerd sources; no
# network beyond apt) and prints the binary's path. Cached by source hash
# under $SHOAL_ANYCLIENT_WORK (default /var/tmp/shoal-anyclient).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${SHOAL_ANYCLIENT_WORK:-/var/tmp/shoal-anyclient}
pkgs=()
command -v go >/dev/null || pkgs+=(golang-go)
[ -d /usr/share/gocode/src/github.com/containerd/containerd ] || pkgs+=(golang-github-containerd-containerd-dev)
if [ ${#pkgs[@]} -gt 0 ]; then
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >&2
fi
bin=$work/anyclient-$(sha256sum "$here/main.go" | cut -c1-16)
if ! [ -x "$bin" ]; then
  mkdir -p "$work"
  (cd "$here" && GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$work/gocache" \
    go build -o "$bin.tmp" . >&2 && mv "$bin.tmp" "$bin")
fi
echo "$bin"

#!/usr/bin/env bash
# Builds Shoal's end-to-end test images from busybox-static with umoci and
# pushes them to a registry with skopeo. Needs root (chown, setuid bits).
#
#   tests/e2e/images.sh WORKDIR REGISTRY [NAME...]
#
# NAME is busybox, layered or big (default: busybox and layered). For each
# image it writes:
#   WORKDIR/NAME.ref     the pushed reference, e.g. 127.0.0.1:5000/layered:1
#   WORKDIR/NAME.cmd     a busybox sh script to run in the container
#   WORKDIR/NAME.out     what that script must print
#   WORKDIR/ref/NAME/    the final image unpacked by umoci (reference tree)
#
# Images:
#   busybox:1  one layer: a static busybox and its applet symlinks.
#   layered:1  four layers that exercise what a snapshotter must get right:
#              whiteouts of files and directories, an opaque directory (with a
#              literal .wh..wh..opq entry), whiteout-then-recreate, type
#              changes (file<->dir), hardlinks, absolute/relative/dangling
#              symlinks, a fifo, odd file names, setuid/setgid/sticky bits,
#              non-root owners, an empty file, a 4 MiB random file and a
#              deeply nested file.
#   big:1      busybox:1 plus a layer with a 32 MiB random file that the test
#              program never reads: what lazy pulling should not fetch first.
set -euo pipefail
umask 022

work=${1:?usage: images.sh WORKDIR REGISTRY [NAME...]}
registry=${2:?usage: images.sh WORKDIR REGISTRY [NAME...]}
shift 2
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(busybox layered)

mkdir -p "$work"
work=$(cd "$work" && pwd)
oci="$work/oci"
[ -d "$oci" ] || umoci init --layout "$oci"

step() { printf '  images: %s\n' "$*" >&2; }

# umoci_new TAG BUNDLE: a fresh empty image with a PATH, unpacked to BUNDLE.
umoci_new() {
  umoci new --image "$oci:$1"
  umoci config --image "$oci:$1" --config.env PATH=/bin:/usr/bin:/sbin:/usr/sbin \
    --config.cmd /bin/sh --config.workingdir /
  rm -rf "$2"
  umoci unpack --image "$oci:$1" "$2"
}

# repack TAG BUNDLE COMMENT: append BUNDLE's changes as a new layer.
repack() {
  umoci repack --refresh-bundle --history.comment "$3" --image "$oci:$1" "$2"
}

push() {
  skopeo --insecure-policy copy --quiet --dest-tls-verify=false \
    "oci:$oci:$1" "docker://$registry/$2" >/dev/null
  printf '%s\n' "$registry/$2" >"$work/$3.ref"
}

# reference NAME TAG: unpack the final image as the tree a container must see.
reference() {
  rm -rf "$work/ref/$1"
  mkdir -p "$work/ref"
  umoci unpack --image "$oci:$2" "$work/ref/$1" >/dev/null
}

# busybox_rootfs DIR: static busybox, relative applet symlinks, a minimal /etc.
busybox_rootfs() {
  local r=$1 applet
  mkdir -p "$r/bin" "$r/etc" "$r/proc" "$r/sys" "$r/dev" "$r/run" "$r/tmp" "$r/root"
  chmod 1777 "$r/tmp"
  chmod 0700 "$r/root"
  cp /bin/busybox "$r/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$r/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$r/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$r/etc/group"
}

build_busybox() {
  local b="$work/bundle-busybox" sum
  step "busybox:1 (one layer)"
  umoci_new busybox-1 "$b"
  busybox_rootfs "$b/rootfs"
  repack busybox-1 "$b" "busybox-static with applet links"
  push busybox-1 busybox:1 busybox
  reference busybox busybox-1
  sum=$(sha256sum /bin/busybox | cut -d' ' -f1)
  cat >"$work/busybox.cmd" <<'EOF'
echo hello from shoal
readlink /bin/sh
sha256sum /bin/busybox
echo written >/tmp/scratch && cat /tmp/scratch
EOF
  printf 'hello from shoal\nbusybox\n%s  /bin/busybox\nwritten\n' "$sum" >"$work/busybox.out"
}

build_big() {
  local b="$work/bundle-big"
  step "big:1 (busybox:1 + a 32 MiB file nobody reads)"
  [ -f "$work/busybox.ref" ] || build_busybox
  rm -rf "$b"
  umoci unpack --image "$oci:busybox-1" "$b" >/dev/null
  head -c $((32 << 20)) /dev/urandom >"$b/rootfs/unused.bin"
  repack big-1 "$b" "32 MiB unused file"
  push big-1 big:1 big
  reference big big-1
  echo 'echo hello from big' >"$work/big.cmd"
  echo 'hello from big' >"$work/big.out"
}

# 200-character file name.
long_name=$(printf 'L%.0s' $(seq 1 200))
deep=deep/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t

build_layered() {
  local b="$work/bundle-layered" r big_sum
  r="$b/rootfs"
  step "layered:1 layer 1 (base files)"
  umoci_new layered-1 "$b"
  busybox_rootfs "$r"
  mkdir -p "$r/data/dir-to-delete/sub" "$r/data/dir-becomes-file" "$r/opaque/sub" "$r/big"
  echo keep >"$r/data/keep.txt"
  echo old >"$r/data/delete-me.txt"
  echo raw >"$r/data/raw-delete.txt"
  echo a >"$r/data/dir-to-delete/a"
  echo c >"$r/data/dir-to-delete/sub/c"
  echo v1 >"$r/data/overwrite.txt"
  echo mode >"$r/data/chmod-me"
  chmod 0644 "$r/data/chmod-me"
  echo file >"$r/data/file-becomes-dir"
  echo x >"$r/data/dir-becomes-file/x"
  echo old1 >"$r/opaque/old1"
  echo old2 >"$r/opaque/sub/old2"
  head -c 4194304 /dev/urandom >"$r/big/big.bin"
  big_sum=$(sha256sum "$r/big/big.bin" | cut -d' ' -f1)
  repack layered-1 "$b" "base files"

  step "layered:1 layer 2 (deletes, links, fifo, names, modes, owners)"
  rm "$r/data/delete-me.txt"
  rm -r "$r/data/dir-to-delete"
  echo v2 >"$r/data/overwrite.txt"
  : >"$r/data/empty"
  mkdir -p "$r/links/sub"
  echo linked >"$r/links/h1"
  ln "$r/links/h1" "$r/links/h2"
  ln "$r/links/h1" "$r/links/sub/h3"
  ln "$r/data/keep.txt" "$r/links/keep-hard"   # to a file of the layer below
  ln -s /data/keep.txt "$r/links/abs"
  ln -s ../data/keep.txt "$r/links/rel"
  ln -s /does/not/exist "$r/links/dangling-abs"
  ln -s ../nope "$r/links/dangling-rel"
  ln -s /data "$r/links/dir"
  ln -s loop-b "$r/links/loop-a"
  ln -s loop-a "$r/links/loop-b"
  mkdir -p "$r/special"
  mkfifo "$r/special/fifo"
  mkdir -p "$r/names"
  echo space >"$r/names/with space"
  echo unicode >"$r/names/ünïcödé-名前-🐟"
  echo single >"$r/names/quote'single"
  echo double >"$r/names/quote\"double"
  echo dash >"$r/names/-leading-dash"
  echo long >"$r/names/$long_name"
  echo backslash >"$r/names/back\\slash"
  echo star >"$r/names/star*glob?"
  mkdir -p "$r/modes/sticky-dir" "$r/modes/setgid-dir"
  echo suid >"$r/modes/setuid"
  echo sgid >"$r/modes/setgid"
  echo ro >"$r/modes/readonly"
  echo none >"$r/modes/noperm"
  chmod 4755 "$r/modes/setuid"
  chmod 2755 "$r/modes/setgid"
  chmod 1777 "$r/modes/sticky-dir"
  chmod 2775 "$r/modes/setgid-dir"
  chmod 0444 "$r/modes/readonly"
  chmod 0000 "$r/modes/noperm"
  mkdir -p "$r/owners/dir"
  echo owned >"$r/owners/file"
  echo nobody >"$r/owners/dir/nobody"
  chown 1234:5678 "$r/owners/file"
  chown 4321:8765 "$r/owners/dir"
  chown 65534:65534 "$r/owners/dir/nobody"
  mkdir -p "$r/$deep"
  echo deep >"$r/$deep/file.txt"
  repack layered-1 "$b" "deletes, links, fifo, names, modes, owners"

  step "layered:1 layer 3 (hand-made tar: opaque dir, whiteout, type changes)"
  local s="$work/raw-layer"
  rm -rf "$s" && mkdir -p "$s/opaque/sub2" "$s/data"
  : >"$s/opaque/.wh..wh..opq"
  echo new1 >"$s/opaque/new1"
  echo new2 >"$s/opaque/sub2/new2"
  : >"$s/data/.wh.raw-delete.txt"
  # Type changes the way docker writes them: the new entry alone, no whiteout.
  mkdir "$s/data/file-becomes-dir"
  echo inside >"$s/data/file-becomes-dir/inside"
  echo now-a-file >"$s/data/dir-becomes-file"
  chown 1000:1000 "$s/opaque/new1"
  tar -C "$s" --numeric-owner --sort=name -cf "$work/raw-layer.tar" opaque data
  umoci raw add-layer --history.comment "opaque dir, whiteout, type changes" \
    --image "$oci:layered-1" "$work/raw-layer.tar"

  step "layered:1 layer 4 (recreate, chmod-only, retarget)"
  rm -rf "$b"
  umoci unpack --image "$oci:layered-1" "$b" >/dev/null
  echo reborn >"$r/data/delete-me.txt"
  chmod 0600 "$r/data/chmod-me"
  ln -sfn ../data/overwrite.txt "$r/links/rel"
  repack layered-1 "$b" "recreate, chmod-only, retarget"

  push layered-1 layered:1 layered
  reference layered layered-1

  cat >"$work/layered.cmd" <<EOF
cat /data/keep.txt /data/overwrite.txt /data/delete-me.txt /links/rel /links/abs
for p in /data/dir-to-delete /data/raw-delete.txt /opaque/old1 /opaque/sub; do
  if [ -e "\$p" ]; then echo "present \$p"; else echo "absent \$p"; fi
done
ls -A /opaque /opaque/sub2
cat /data/file-becomes-dir/inside /data/dir-becomes-file
for l in abs rel dangling-abs dangling-rel dir; do readlink /links/\$l; done
[ -p /special/fifo ] && echo fifo
stat -c '%a %u:%g %h %n' /data/chmod-me /modes/* /owners/file /owners/dir /owners/dir/nobody /links/h1 /opaque/new1
[ /links/h1 -ef /links/sub/h3 ] && echo hardlinked
wc -c </data/empty
ls /names | wc -l
cat "/names/$long_name" "/names/ünïcödé-名前-🐟" /names/-leading-dash
sha256sum /big/big.bin
cat /$deep/file.txt
EOF
  cat >"$work/layered.out" <<EOF
keep
v2
reborn
v2
keep
absent /data/dir-to-delete
absent /data/raw-delete.txt
absent /opaque/old1
absent /opaque/sub
/opaque:
new1
sub2

/opaque/sub2:
new2
inside
now-a-file
/data/keep.txt
../data/overwrite.txt
/does/not/exist
../nope
/data
fifo
600 0:0 1 /data/chmod-me
0 0:0 1 /modes/noperm
444 0:0 1 /modes/readonly
2755 0:0 1 /modes/setgid
2775 0:0 2 /modes/setgid-dir
4755 0:0 1 /modes/setuid
1777 0:0 2 /modes/sticky-dir
644 1234:5678 1 /owners/file
755 4321:8765 2 /owners/dir
644 65534:65534 1 /owners/dir/nobody
644 0:0 3 /links/h1
644 1000:1000 1 /opaque/new1
hardlinked
0
8
long
unicode
dash
$big_sum  /big/big.bin
deep
EOF
}

for name in "${names[@]}"; do
  case $name in
    busybox) build_busybox ;;
    layered) build_layered ;;
    big) build_big ;;
    *) echo "images.sh: unknown image $name" >&2; exit 2 ;;
  esac
done

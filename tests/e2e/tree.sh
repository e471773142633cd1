# shellcheck shell=sh
# Dumps the file tree under the current directory, one tab-separated line per
# path: inode, nlink, path, type, mode, uid, gid, size, mtime, content.
# Runs under busybox sh only (inside containers it is bind-mounted at
# /.e2e-tools with a static busybox beside it), so it uses nothing but $BB.
# lib.sh's e2e_tree_normalize turns inodes into hardlink groups and sorts.
#
# - content: sha256 for regular files, "-> target" for symlinks, else "-".
# - size and mtime are printed only where they are a property of the image:
#   size for regular files and symlinks, mtime for everything but directories
#   (directory mtimes move whenever an entry below them is unpacked).
# - Runtime mounts and the files runc/containerd may create are skipped:
#   /proc /sys /dev /run /tmp /etc/hostname /etc/hosts /etc/resolv.conf and
#   the tools mount itself. Names must not contain newlines.
BB=${BB:-/.e2e-tools/busybox}
TAB=$(printf '\t')

"$BB" find . \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run \
  -o -path ./tmp -o -path ./.e2e-tools -o -path ./etc/hostname \
  -o -path ./etc/hosts -o -path ./etc/resolv.conf \) -prune \
  -o ! -path . -print |
  while IFS= read -r p; do
    IFS='|' read -r ino nlink type mode uid gid size mtime <<EOF
$("$BB" stat -c '%i|%h|%F|%a|%u|%g|%s|%Y' "$p")
EOF
    content=-
    case $type in
      "regular file" | "regular empty file")
        type=file
        content=$("$BB" sha256sum "$p")
        content=${content%% *}
        ;;
      "symbolic link")
        type=symlink
        content="-> $("$BB" readlink "$p")"
        ;;
      directory)
        size=-
        mtime=-
        ;;
      *)
        size=-
        ;;
    esac
    printf '%s\n' "$ino$TAB$nlink$TAB${p#.}$TAB$type${TAB}mode=$mode${TAB}owner=$uid:$gid${TAB}size=$size${TAB}mtime=$mtime$TAB$content"
  done

#!/usr/bin/env python3
"""Registers Shoal in a containerd config.toml, idempotently.

    containerd_patch.py IN OUT

Reads IN, writes the patched text to OUT (exit 0), or prints why the config
is refused to stderr (exit 2) and writes nothing. Used by shoal-install.sh,
which copies the host's file, patches the copy and writes it back.

Config version 2 (containerd 1.6/1.7): [proxy_plugins.shoal] and, in
[plugins."io.containerd.grpc.v1.cri".containerd], snapshotter = "shoal" and
disable_snapshot_annotations = false. Version 3 (containerd 2.x): the same
keys in [plugins."io.containerd.cri.v1.images"], and the proxy plugin's
exports.enable_remote_snapshot_annotations for the 2.1+ transfer service.

What it adds is marked, so that a second run first takes it out and then
adds the same text again (the output is then identical): keys set inside an
existing table end with `# shoal-install`; new tables go in one block
between `# >>> shoal-install` and `# <<< shoal-install` at the end. An
existing [proxy_plugins.shoal] is replaced. The result is parsed again and
checked before anything is written. The original is kept by the installer
(uninstall restores it byte for byte); this script never restores.
"""
import sys
import tomllib

TAG = "# shoal-install"
BEGIN = "# >>> shoal-install (added by deploy/install/shoal-install.sh; uninstall restores the original)"
END = "# <<< shoal-install"
ADDRESS = "/run/shoal/shoal.sock"
ROOT = "/var/lib/shoal"
CRI_TABLE = {
    2: ["plugins", "io.containerd.grpc.v1.cri", "containerd"],
    3: ["plugins", "io.containerd.cri.v1.images"],
}
CRI_KEYS = [("snapshotter", '"shoal"'), ("disable_snapshot_annotations", "false")]


class Refused(Exception):
    """The config cannot be patched safely."""


def header_path(line):
    """The key path of a `[table]` header line, or None (also for `[[...]]`)."""
    s = line.strip()
    if not s.startswith("[") or s.startswith("[["):
        return None
    try:
        d = tomllib.loads(s + "\n")
    except tomllib.TOMLDecodeError:
        return None
    path = []
    while isinstance(d, dict) and len(d) == 1:
        k = next(iter(d))
        path.append(k)
        d = d[k]
    return path if d == {} else None


def is_header(line):
    s = line.strip()
    return s.startswith("[[") or header_path(line) is not None


def strip_ours(lines):
    out, inside = [], False
    for line in lines:
        if line.startswith("# >>> shoal-install"):
            inside = True
            continue
        if inside:
            inside = not line.startswith(END)
            continue
        if line.rstrip().endswith(TAG):
            continue
        out.append(line)
    return out


def drop_sections(lines, prefix):
    """Removes every table whose path starts with prefix (header to next header)."""
    out, dropping = [], False
    for line in lines:
        if is_header(line):
            p = header_path(line)
            dropping = p is not None and p[: len(prefix)] == prefix
        if not dropping:
            out.append(line)
    return out


def key_of(line):
    s = line.strip()
    if "=" not in s or s.startswith("#"):
        return None
    return s.split("=", 1)[0].strip().strip('"')


def patch(text):
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise Refused(f"not valid TOML ({e}); fix it, then run the installer again")
    version = cfg.get("version", 1)
    if version not in CRI_TABLE:
        raise Refused(f"config version {version!r}: only 2 (containerd 1.6/1.7) and 3 (2.x) "
                      "are handled; run `containerd config migrate` first")
    if cfg.get("imports"):
        print(f"shoal-install: note: the config imports {cfg['imports']}; a CRI snapshotter "
              "set there overrides this file's", file=sys.stderr)
    lines = strip_ours(text.splitlines())
    lines = drop_sections(lines, ["proxy_plugins", "shoal"])
    table = CRI_TABLE[version]
    block = []
    at = next((i for i, l in enumerate(lines) if header_path(l) == table), None)
    if at is None:
        block += ["[" + ".".join(k if k.isidentifier() else f'"{k}"' for k in table) + "]"]
        block += [f"  {k} = {v}" for k, v in CRI_KEYS] + [""]
    else:
        end = next((j for j in range(at + 1, len(lines)) if is_header(lines[j])), len(lines))
        names = {k for k, _ in CRI_KEYS}
        body = [l for l in lines[at + 1:end] if key_of(l) not in names]
        indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())] + "  "
        ours = [f"{indent}{k} = {v}  {TAG}" for k, v in CRI_KEYS]
        lines = lines[: at + 1] + ours + body + lines[end:]
    block += ["[proxy_plugins.shoal]", '  type = "snapshot"', f'  address = "{ADDRESS}"',
              "[proxy_plugins.shoal.exports]", f'  root = "{ROOT}"']
    if version == 3:
        block += ['  enable_remote_snapshot_annotations = "true"']
    while lines and not lines[-1].strip():
        lines.pop()
    out = "\n".join(lines + ([""] if lines else []) + [BEGIN] + block + [END]) + "\n"
    check(out, version)
    return out


def check(text, version):
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise Refused(f"the patched config would not parse ({e}); the file is written in a "
                      "form this installer cannot edit (dotted keys or inline tables for the "
                      "CRI plugin or proxy_plugins?): merge deploy/containerd/ by hand")
    sect = cfg
    for k in CRI_TABLE[version]:
        sect = sect.get(k, {})
    plugin = cfg.get("proxy_plugins", {}).get("shoal", {})
    if (sect.get("snapshotter") != "shoal" or sect.get("disable_snapshot_annotations") is not False
            or plugin.get("address") != ADDRESS or plugin.get("type") != "snapshot"):
        raise Refused("the patched config does not have the expected values; merge "
                      "deploy/containerd/ by hand")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    src, dst = sys.argv[1:]
    try:
        with open(src, encoding="utf-8") as f:
            out = patch(f.read())
    except (Refused, UnicodeDecodeError) as e:
        print(f"shoal-install: refusing {src}: {e}", file=sys.stderr)
        sys.exit(2)
    with open(dst, "w", encoding="utf-8") as f:
        f.write(out)


if __name__ == "__main__":
    main()

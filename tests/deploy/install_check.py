"""Runs deploy/install/shoal-install.sh against scratch roots (no host is
touched: --root is a temp dir, and the host command prefix is replaced by a
logger so restarts are recorded, not run). Called by check.py.

For the real `containerd config default` of the installed containerd (1.6,
read back with that containerd's `config dump`), a containerd 1.6/1.7 config (version 2, as `containerd config default`
writes it: nested, indented tables with snapshotter = "overlayfs") and a 2.x
one (version 3): the installed files are the bundle's, the config parses and
has the proxy plugin and the CRI keys, a second install changes no byte and
restarts nothing, uninstall restores the original config byte for byte and
removes the rest; an operator's edit made after install is kept beside the
restored file; --no-restart restarts nothing; the config keeps its inode
and a bind-mounted one is written through (where sed -i fails); a running
binary is replaced and, on uninstall, the one it replaced comes back. Broken TOML, config version 1 and a layout the patcher
cannot edit (dotted keys) are refused, with the file left unchanged.
"""
import os
import pathlib
import shutil
import subprocess
import tempfile
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]
INSTALLER = ROOT / "deploy/install/shoal-install.sh"

V2 = """version = 2
root = "/var/lib/containerd"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.6"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      disable_snapshot_annotations = true
      snapshotter = "overlayfs"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"


"""
V3 = """version = 3
root = '/var/lib/containerd'

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  disable_snapshot_annotations = true
  discard_unpacked_layers = true

[plugins.'io.containerd.cri.v1.runtime'.containerd]
  default_runtime_name = 'runc'
"""
REFUSED = {
    "broken TOML": "version = 2\n[plugins\n",
    "config version 1": 'root = "/var/lib/containerd"\n',
    "dotted CRI keys": 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  containerd.snapshotter = "overlayfs"\n',
}
BINS = ["shoal-snapshotter", "shoal", "shoal-fdholder"]


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(root, bundle, log, *args):
    env = dict(os.environ, SHOAL_INSTALL_HOST_EXEC=f"{ROOT}/tests/deploy/log-args.sh {log}")
    return subprocess.run([str(INSTALLER), *args, "--root", str(root), "--from", str(bundle)],
                          env=env, capture_output=True, text=True)


def scratch(tmp, name, config):
    root, bundle = tmp / name / "root", tmp / name / "bundle"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(config)
    bundle.mkdir()
    for b in BINS:
        (bundle / b).write_text(f"#!/bin/sh\necho {b}\n")
    (bundle / "shoal-snapshotter.service").write_bytes((ROOT / "systemd/shoal-snapshotter.service").read_bytes())
    return root, bundle, tmp / name / "host.log"


def run_all(check):
    with tempfile.TemporaryDirectory(prefix="h-install-check-") as t:
        tmp = pathlib.Path(t)
        for name, config, version, path in [
                ("v2", V2, 2, ["plugins", "io.containerd.grpc.v1.cri", "containerd"]),
                ("v3", V3, 3, ["plugins", "io.containerd.cri.v1.images"])]:
            root, bundle, log = scratch(tmp, name, config)
            before = snapshot(root)
            inode = (root / "etc/containerd/config.toml").stat().st_ino
            r = run(root, bundle, log, "install")
            check(f"install ({name}): exit 0", r.returncode == 0, r.stderr)
            if r.returncode != 0:
                continue
            cfg_path = root / "etc/containerd/config.toml"
            try:
                cfg = tomllib.loads(cfg_path.read_text())
            except tomllib.TOMLDecodeError as e:
                check(f"install ({name}): containerd config parses", False, e)
                continue
            sect = cfg
            for k in path:
                sect = sect.get(k, {})
            plugin = cfg.get("proxy_plugins", {}).get("shoal", {})
            check(f"install ({name}): version {version}; CRI snapshotter shoal, annotations on",
                  cfg.get("version") == version and sect.get("snapshotter") == "shoal"
                  and sect.get("disable_snapshot_annotations") is False, sect)
            check(f"install ({name}): [proxy_plugins.shoal] snapshot at /run/shoal/shoal.sock, exports.root",
                  plugin.get("type") == "snapshot" and plugin.get("address") == "/run/shoal/shoal.sock"
                  and plugin.get("exports", {}).get("root") == "/var/lib/shoal", plugin)
            if version == 3:
                check("install (v3): exports.enable_remote_snapshot_annotations (2.1+ transfer service)",
                      plugin["exports"].get("enable_remote_snapshot_annotations") == "true")
            other = cfg["plugins"]["io.containerd.cri.v1.images"].get("discard_unpacked_layers") if version == 3 \
                else cfg["plugins"]["io.containerd.grpc.v1.cri"].get("sandbox_image")
            check(f"install ({name}): the config's other keys kept", other in (True, "registry.k8s.io/pause:3.6"))
            check(f"install ({name}): binaries and unit are the bundle's",
                  all((root / "usr/local/bin" / b).read_bytes() == (bundle / b).read_bytes()
                      and os.access(root / "usr/local/bin" / b, os.X_OK) for b in BINS)
                  and (root / "etc/systemd/system/shoal-snapshotter.service").read_bytes()
                  == (bundle / "shoal-snapshotter.service").read_bytes())
            restarts = log.read_text() if log.exists() else ""
            check(f"install ({name}): daemon-reload, shoal and containerd restarted on the host",
                  all(s in restarts for s in ["systemctl daemon-reload", "systemctl restart shoal-snapshotter",
                                              "systemctl enable shoal-snapshotter",
                                              "systemctl restart containerd"]), restarts)
            check(f"install ({name}): containerd's config written in place (same inode)",
                  cfg_path.stat().st_ino == inode)
            installed = snapshot(root)
            log.unlink()
            r = run(root, bundle, log, "install")
            check(f"install twice ({name}): exit 0, no byte changed, nothing restarted",
                  r.returncode == 0 and snapshot(root) == installed and not log.exists(), r.stdout + r.stderr)
            r = run(root, bundle, log, "uninstall")
            after = snapshot(root)
            check(f"uninstall ({name}): exit 0, config restored byte for byte, nothing else left",
                  r.returncode == 0 and after == before, sorted(set(after) ^ set(before)) or r.stderr)
            check(f"install and uninstall ({name}): containerd's config written in place "
                  "(same inode: it may be a bind mount)", cfg_path.stat().st_ino == inode)
            check(f"uninstall ({name}): containerd restarted, shoal disabled and stopped",
                  "systemctl restart containerd" in log.read_text()
                  and "systemctl disable --now shoal-snapshotter" in log.read_text())
        # The real default config of the containerd on this machine (1.6,
        # version 2), patched, then read back by that containerd itself.
        default = subprocess.run(["containerd", "config", "default"], capture_output=True, text=True) \
            if shutil.which("containerd") else None
        check("containerd config default runs (containerd from scripts/deps.sh)",
              default is not None and default.returncode == 0, default and default.stderr)
        if default is not None and default.returncode == 0:
            root, bundle, log = scratch(tmp, "default", default.stdout)
            r = run(root, bundle, log, "install", "--no-restart")
            cfg_path = root / "etc/containerd/config.toml"
            dump = subprocess.run(["containerd", "--config", str(cfg_path), "config", "dump"],
                                  capture_output=True, text=True)
            try:
                cfg = tomllib.loads(dump.stdout)
                cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
                ok = (r.returncode == 0 and dump.returncode == 0 and cri["snapshotter"] == "shoal"
                      and cri["disable_snapshot_annotations"] is False
                      and cfg["proxy_plugins"]["shoal"]["address"] == "/run/shoal/shoal.sock")
            except (KeyError, tomllib.TOMLDecodeError) as e:
                ok = False
                dump.stderr += repr(e)
            check("install on `containerd config default`: containerd's own `config dump` "
                  "reads snapshotter shoal, annotations on, the proxy plugin", ok, r.stderr + dump.stderr)
            installed = snapshot(root)
            r = run(root, bundle, log, "install", "--no-restart")
            again = snapshot(root)
            r2 = run(root, bundle, log, "uninstall", "--no-restart")
            check("install twice, then uninstall, on `containerd config default`: "
                  "unchanged, then the default byte for byte",
                  r.returncode == 0 and again == installed and r2.returncode == 0
                  and cfg_path.read_text() == default.stdout, r.stdout + r2.stdout + r2.stderr)

        # A running binary is replaced (rename, not a write: ETXTBSY), and
        # one that was there before install comes back on uninstall.
        root, bundle, log = scratch(tmp, "busy", V2)
        (root / "usr/local/bin").mkdir(parents=True)
        shutil.copy("/bin/sleep", root / "usr/local/bin/shoal-snapshotter")
        shutil.copy("/bin/sleep", bundle / "shoal-snapshotter")
        running = subprocess.Popen([root / "usr/local/bin/shoal-snapshotter", "60"])
        new = None
        try:
            shutil.copy("/bin/cat", bundle / "shoal-snapshotter")
            r = run(root, bundle, log, "install", "--no-restart")
            ok = r.returncode == 0 and (root / "usr/local/bin/shoal-snapshotter").read_bytes() \
                == pathlib.Path("/bin/cat").read_bytes()
            check("install replaces a running shoal-snapshotter", ok, r.stderr)
            new = subprocess.Popen([root / "usr/local/bin/shoal-snapshotter"], stdin=subprocess.PIPE)
            r = run(root, bundle, log, "uninstall", "--no-restart")
            check("uninstall puts back the binary install replaced, while it runs",
                  r.returncode == 0 and (root / "usr/local/bin/shoal-snapshotter").read_bytes()
                  == pathlib.Path("/bin/sleep").read_bytes(), r.stderr)
        finally:
            for p in (running, new):
                if p:
                    p.kill()
                    p.wait()

        # containerd's config as a bind-mounted file (as in a pod that mounts
        # only that file): rename fails there with EBUSY (so does sed -i,
        # checked first to show the mount is real); the installer writes
        # through it. unshare -r -m: the mount lives in a private namespace.
        root, bundle, log = scratch(tmp, "bind", "")
        outside = tmp / "bind" / "outside.toml"
        outside.write_text(V2)

        def in_mount_ns(cmd):
            return subprocess.run(
                ["unshare", "-r", "-m", "sh", "-c",
                 f'mount --bind "$0" "$1/etc/containerd/config.toml" && {cmd}',
                 str(outside), str(root)],
                env=dict(os.environ, I=str(INSTALLER), B=str(bundle)), capture_output=True, text=True)
        r = in_mount_ns('sed -i s/overlayfs/x/ "$1/etc/containerd/config.toml"')
        check("a bind-mounted containerd config: sed -i fails (Device or resource busy)",
              r.returncode != 0 and "busy" in r.stderr and outside.read_text() == V2, r.stderr)
        r = in_mount_ns('"$I" install --no-restart --root "$1" --from "$B"')
        try:
            patched = tomllib.loads(outside.read_text())
        except tomllib.TOMLDecodeError:
            patched = {}
        check("install through a bind-mounted containerd config: written through to its source",
              r.returncode == 0 and patched.get("proxy_plugins", {}).get("shoal", {}).get("type") == "snapshot",
              r.stderr)
        r = in_mount_ns('"$I" uninstall --no-restart --root "$1"')
        check("uninstall through a bind-mounted containerd config: its source restored byte for byte",
              r.returncode == 0 and outside.read_text() == V2, r.stderr)

        root, bundle, log = scratch(tmp, "edited", V2)
        r = run(root, bundle, log, "install", "--no-restart")
        check("install --no-restart: exit 0, nothing restarted", r.returncode == 0 and not log.exists(), r.stderr)
        cfg_path = root / "etc/containerd/config.toml"
        edited = cfg_path.read_text() + "# an operator's edit after install\n"
        cfg_path.write_text(edited)
        r = run(root, bundle, log, "uninstall", "--no-restart")
        kept = root / "etc/containerd/config.toml.before-shoal-uninstall"
        check("uninstall after an operator's edit: original restored, the edited file kept beside it",
              r.returncode == 0 and cfg_path.read_text() == V2 and kept.exists() and kept.read_text() == edited,
              r.stderr)
        for name, config in REFUSED.items():
            root, bundle, log = scratch(tmp, name.replace(" ", "-"), config)
            before = snapshot(root)
            r = run(root, bundle, log, "install")
            check(f"install refuses {name}: exit 1, a message, nothing written, nothing restarted",
                  r.returncode == 1 and "refusing" in r.stderr and snapshot(root) == before
                  and not log.exists(), (r.returncode, r.stderr))

#!/usr/bin/env python3
"""Checks deploy/ without a cluster: every YAML document parses and has the
shape docs/kubernetes.md promises (DaemonSet: system-node-critical, tolerates
every taint, host PID, /dev/fuse, /var/lib/shoal with Bidirectional
propagation, containerd's socket dir; ConfigMap: a config.toml whose keys
are all documented in docs/configuration.md), and every containerd snippet
is TOML with the proxy plugin, the CRI snapshotter and the image-filesystem
export. Prints one PASS/FAIL line per check; exits 1 on any failure.

    python3 tests/deploy/check.py
"""
import pathlib
import re
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
failed = 0


def check(name, ok, detail=""):
    global failed
    print(("PASS  " if ok else "FAIL  ") + name)
    if not ok:
        failed += 1
        if detail:
            print("      " + str(detail))


def documented_keys():
    text = (ROOT / "docs/configuration.md").read_text()
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, re.M))


docs = {}
for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")) + [DEPLOY / "kubelet/kubelet-config.yaml"]:
    try:
        items = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        ok = all(isinstance(d, dict) and d.get("apiVersion") and d.get("kind")
                 and d.get("metadata", {}).get("name") or d.get("kind") == "KubeletConfiguration"
                 for d in items)
        check(f"{path.relative_to(ROOT)}: {len(items)} YAML document(s) with apiVersion, kind, name", ok and items)
        for d in items:
            docs[d["kind"]] = d
    except yaml.YAMLError as e:
        check(f"{path.relative_to(ROOT)}: YAML", False, e)

ds = docs.get("DaemonSet", {})
pod = ds.get("spec", {}).get("template", {}).get("spec", {})
c = (pod.get("containers") or [{}])[0]
mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
vols = {v["name"]: v for v in pod.get("volumes", [])}
check("DaemonSet: priorityClassName system-node-critical", pod.get("priorityClassName") == "system-node-critical")
check("DaemonSet: tolerates every taint", {"operator": "Exists"} in pod.get("tolerations", []))
check("DaemonSet: hostPID (shoal-fdholder outlives the container)", pod.get("hostPID") is True)
check("DaemonSet: privileged", c.get("securityContext", {}).get("privileged") is True)
check("DaemonSet: selector matches the template's labels",
      ds.get("spec", {}).get("selector", {}).get("matchLabels", {}).items()
      <= ds.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}).items())


def host_path(mount_path):
    m = mounts.get(mount_path)
    return m and vols.get(m["name"], {}).get("hostPath", {}).get("path")


check("DaemonSet: /dev/fuse from the host", host_path("/dev/fuse") == "/dev/fuse")
check("DaemonSet: /var/lib/shoal from the host, Bidirectional",
      host_path("/var/lib/shoal") == "/var/lib/shoal"
      and mounts["/var/lib/shoal"].get("mountPropagation") == "Bidirectional")
check("DaemonSet: /run/shoal and containerd's socket dir from the host",
      host_path("/run/shoal") == "/run/shoal" and host_path("/run/containerd") == "/run/containerd")
check("DaemonSet: every mount has a volume", all(m["name"] in vols for m in mounts.values()))
rc = docs.get("RuntimeClass", {})
check("RuntimeClass: the DaemonSet's, handler runc-overlayfs",
      rc.get("metadata", {}).get("name") == pod.get("runtimeClassName") and rc.get("handler") == "runc-overlayfs")

cm = docs.get("ConfigMap", {})
try:
    cfg = tomllib.loads(cm["data"]["config.toml"])
    known = documented_keys()
    keys = set()
    for k, v in cfg.items():
        if isinstance(v, dict):
            keys |= set(v)
        else:
            keys.add(k)
    missing = sorted(keys - known)
    check("ConfigMap: config.toml parses; every key documented in docs/configuration.md", not missing, missing)
    check("ConfigMap: CRI proxy socket = the kubelet's imageServiceEndpoint",
          "unix://" + cfg["cri"]["image_service_socket"] == docs.get("KubeletConfiguration", {}).get("imageServiceEndpoint"))
    check("ConfigMap: the socket is the one containerd snippets name",
          all(tomllib.loads(p.read_text())["proxy_plugins"]["shoal"]["address"] == cfg["address"]
              for p in (DEPLOY / "containerd").glob("*.toml")))
except (KeyError, tomllib.TOMLDecodeError) as e:
    check("ConfigMap: config.toml", False, repr(e))

for path, version, images in [("config-1.6-1.7.toml", 2, 'plugins."io.containerd.grpc.v1.cri".containerd'),
                              ("config-2.x.toml", 3, 'plugins."io.containerd.cri.v1.images"')]:
    try:
        t = tomllib.loads((DEPLOY / "containerd" / path).read_text())
        sect = t
        for part in re.findall(r'"[^"]+"|[^.]+', images):
            sect = sect[part.strip('"')]
        ok = (t["version"] == version and t["proxy_plugins"]["shoal"]["type"] == "snapshot"
              and t["proxy_plugins"]["shoal"]["exports"]["root"] == "/var/lib/shoal"
              and sect["snapshotter"] == "shoal")
        check(f"deploy/containerd/{path}: version {version}, proxy plugin, exports.root, CRI snapshotter", ok)
    except (KeyError, tomllib.TOMLDecodeError) as e:
        check(f"deploy/containerd/{path}", False, repr(e))

import install_check  # noqa: E402  (tests/deploy/install_check.py)
install_check.run_all(check)

print(f"\ndeploy: {failed} failed")
sys.exit(1 if failed else 0)

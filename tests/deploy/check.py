#!/usr/bin/env python3
"""Checks deploy/ without a cluster: every YAML document parses and has the
shape docs/kubernetes.md promises (installer and uninstaller DaemonSets:
system-node-critical, every taint tolerated, host PID, privileged, the
host's / at /host, shoal-install.sh; no RBAC and no API token; the headless
P2P Service and the PodMonitor on the installer's ports, which match the
ConfigMap's; the ConfigMap's config.toml keys all documented in
docs/configuration.md), every containerd snippet is TOML with the proxy
plugin, the CRI snapshotter and the image-filesystem export, and
shoal-install.sh does what it promises against scratch roots
(install_check.py). This is a structural check: Debian 12 packages no
offline schema validator (no kubeconform; kubectl's validation needs an API
server). Prints one PASS/FAIL line per check; exits 1 on any failure.

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


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def default_p2p_listen():
    rs = (ROOT / "snapshotter/src/config.rs").read_text()
    return re.search(r'DEFAULT_P2P_LISTEN: &str = "([^"]+)"', rs).group(1)


docs = {}
for path in (sorted((DEPLOY / "kubernetes").rglob("*.yaml")) + [DEPLOY / "kubelet/kubelet-config.yaml"]):
    try:
        items = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        ok = all(isinstance(d, dict) and d.get("apiVersion") and d.get("kind")
                 and d.get("metadata", {}).get("name") or d.get("kind") == "KubeletConfiguration"
                 for d in items)
        check(f"{path.relative_to(ROOT)}: {len(items)} YAML document(s) with apiVersion, kind, name", ok and items)
        for d in items:
            docs[(d["kind"], d.get("metadata", {}).get("name"))] = d
    except yaml.YAMLError as e:
        check(f"{path.relative_to(ROOT)}: YAML", False, e)

check("no RBAC objects (Shoal calls no Kubernetes API)",
      not any(k in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding") for k, _ in docs))
sa = docs.get(("ServiceAccount", "shoal"), {})
check("ServiceAccount shoal: no API token", sa.get("automountServiceAccountToken") is False)

for name, verb in [("shoal-installer", "install"), ("shoal-uninstaller", "uninstall")]:
    ds = docs.get(("DaemonSet", name), {})
    pod = ds.get("spec", {}).get("template", {}).get("spec", {})
    c = (pod.get("containers") or [{}])[0]
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    host = mounts.get("/host")
    check(f"DaemonSet {name}: system-node-critical, tolerates every taint",
          pod.get("priorityClassName") == "system-node-critical"
          and {"operator": "Exists"} in pod.get("tolerations", []))
    check(f"DaemonSet {name}: hostPID (nsenter -t 1), privileged, no API token",
          pod.get("hostPID") is True and c.get("securityContext", {}).get("privileged") is True
          and pod.get("automountServiceAccountToken") is False)
    check(f"DaemonSet {name}: the host's / at /host",
          host is not None and vols.get(host["name"], {}).get("hostPath", {}).get("path") == "/")
    check(f"DaemonSet {name}: runs shoal-install.sh {verb} --root /host, then sleeps",
          f"/opt/shoal/shoal-install.sh {verb} --root /host" in " ".join(c.get("command", []))
          and "sleep infinity" in " ".join(c.get("command", [])))
    check(f"DaemonSet {name}: selector matches the template's labels; every mount has a volume",
          ds.get("spec", {}).get("selector", {}).get("matchLabels", {}).items()
          <= ds.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}).items()
          and all(m["name"] in vols for m in mounts.values()))

ds = docs.get(("DaemonSet", "shoal-installer"), {})
tmpl = ds.get("spec", {}).get("template", {})
pod = tmpl.get("spec", {})
c = (pod.get("containers") or [{}])[0]
ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
check("installer: host network (pod IP = node IP for the Service and PodMonitor)",
      pod.get("hostNetwork") is True and pod.get("dnsPolicy") == "ClusterFirstWithHostNet")
check("installer: config.toml from the ConfigMap into the bundle dir",
      any(m["mountPath"] == "/opt/shoal/config.toml" and m.get("subPath") == "config.toml"
          for m in c.get("volumeMounts", []))
      and any(v.get("configMap", {}).get("name") == "shoal-config" for v in pod.get("volumes", [])))
check("no DaemonSet runs the daemon in a pod (Dragonfly helm-charts #387)",
      not any("shoal-snapshotter" in " ".join(d.get("spec", {}).get("template", {}).get("spec", {})
                                              .get("containers", [{}])[0].get("command", []))
              for (k, _), d in docs.items() if k == "DaemonSet"))
svc = docs.get(("Service", "shoal-peers"), {}).get("spec", {})
check("Service shoal-peers: headless, publishNotReadyAddresses, selects the installer pods",
      svc.get("clusterIP") == "None" and svc.get("publishNotReadyAddresses") is True
      and svc.get("selector", {}).items() <= tmpl.get("metadata", {}).get("labels", {}).items())
svc_port = (svc.get("ports") or [{}])[0]
check("Service shoal-peers: port and target = [p2p] listen's port",
      svc_port.get("port") == port_of(default_p2p_listen()) == ports.get(svc_port.get("targetPort")),
      (svc_port, ports))
pm = docs.get(("PodMonitor", "shoal"), {}).get("spec", {})
ep = (pm.get("podMetricsEndpoints") or [{}])[0]
check("PodMonitor shoal: /metrics on the installer pods' named port",
      ep.get("path") == "/metrics" and ep.get("port") in ports
      and pm.get("selector", {}).get("matchLabels", {}).items() <= tmpl.get("metadata", {}).get("labels", {}).items())

cm = docs.get(("ConfigMap", "shoal-config"), {})
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
          "unix://" + cfg["cri"]["image_service_socket"] == docs.get(("KubeletConfiguration", None), {}).get("imageServiceEndpoint"))
    check("ConfigMap: [metrics] on the node's addresses, at the installer's `metrics` port",
          cfg["metrics"]["address"].startswith("0.0.0.0:")
          and port_of(cfg["metrics"]["address"]) == ports.get(ep.get("port")))
    check("ConfigMap: [p2p] listen (if set) = the Service's port",
          port_of(cfg.get("p2p", {}).get("listen", default_p2p_listen())) == svc_port.get("port"))
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

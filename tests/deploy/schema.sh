#!/usr/bin/env bash
# Validates the Kubernetes manifests under deploy/kubernetes against the
# Kubernetes OpenAPI schemas, offline, with `kubernetes-validate` (PyPI; its
# schemas ship in the package, no cluster needed). Strict: an unknown field
# is an error. Checked for the oldest and newest Kubernetes the docs name.
# Custom resources (the PodMonitor) have no schema there; tests/deploy/check.py
# checks their structure.
#
# The tool goes into a virtualenv under target/ (made once, reused).
set -euo pipefail
cd "$(dirname "$0")/../.."

version=1.37.0
venv=${CARGO_TARGET_DIR:-target}/deploy-venv
if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -qF "$version"; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$version"
fi

mapfile -t files < <(find deploy/kubernetes -name '*.yaml' | sort)
[ ${#files[@]} -gt 0 ] || { echo "schema: no manifests under deploy/kubernetes" >&2; exit 1; }
failed=0
for k in 1.29.0 1.37.0; do
  if "$venv/bin/kubernetes-validate" --strict --quiet --no-warn -k "$k" "${files[@]}"; then
    echo "PASS  ${#files[@]} manifests validate (strict) against Kubernetes $k"
  else
    echo "FAIL  manifests do not validate against Kubernetes $k"
    failed=1
  fi
done
exit "$failed"

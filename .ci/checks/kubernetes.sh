#!/usr/bin/env bash
# Checks the Kubernetes manifests under deploy/kubernetes/: every resource against the
# Kubernetes OpenAPI schema (kubernetes-validate --strict: unknown fields are errors), and the
# daemon config embedded in the ConfigMap through `mongo-syncd check-config` with the Secret's
# files provided in a scratch directory.
# Usage: .ci/checks/kubernetes.sh MONGO_SYNCD_BINARY   (needs .venv with kubernetes-validate, PyYAML)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
binary=${1:?usage: $0 MONGO_SYNCD_BINARY}
validate=.venv/bin/kubernetes-validate
[[ -x $validate ]] || { echo "FAIL: $validate not found (pip install kubernetes-validate)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for manifest in deploy/kubernetes/*.yaml; do
    "$validate" --strict --quiet "$manifest"
    echo "   ok   schema $manifest"
    .venv/bin/python - "$manifest" "$work" <<'PY'
import pathlib
import sys

import yaml

manifest, work = sys.argv[1], pathlib.Path(sys.argv[2])
for doc in yaml.safe_load_all(open(manifest)):
    if doc and doc.get("kind") == "ConfigMap":
        for name, text in (doc.get("data") or {}).items():
            if name.endswith(".toml"):
                (work / name).write_text(text.replace("/var/run/secrets/mongo-syncd/", f"{work}/secrets/"))
PY
    mkdir -p "$work/secrets"
    echo "mongodb://syncer:secret@src.example.net:27017/?replicaSet=rs0" >"$work/secrets/source-uri"
    echo "mongodb://writer:secret@dst.example.net:27017/?replicaSet=dr0" >"$work/secrets/destination-uri"
    echo "ci-token" >"$work/secrets/http-token"
    chmod 0600 "$work/secrets/"*
    for cfg in "$work"/*.toml; do
        [[ -f $cfg ]] || continue
        "$binary" check-config --config "$cfg" >/dev/null
        echo "   ok   check-config of $(basename "$cfg") in $manifest"
    done
done
echo "OK: Kubernetes manifests"

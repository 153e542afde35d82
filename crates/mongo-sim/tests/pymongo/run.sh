#!/usr/bin/env bash
# Runs the PyMongo compatibility suite against the real mongo-sim binary.
# Creates (or reuses) a virtualenv at the repository root (.venv), builds mongo-sim if needed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "${here}/../../../.." && pwd)"
venv="${root}/.venv"

if [[ ! -x "${venv}/bin/python" ]]; then
    python3 -m venv "${venv}"
fi
if ! "${venv}/bin/python" -c 'import pymongo, pytest' 2>/dev/null; then
    "${venv}/bin/pip" install --quiet 'pymongo>=4,<5' pytest
fi

if [[ -z "${MONGO_SIM_BIN:-}" ]]; then
    (cd "${root}" && cargo build --quiet -p mongo-sim --bin mongo-sim)
    export MONGO_SIM_BIN="${CARGO_TARGET_DIR:-${root}/target}/debug/mongo-sim"
fi

cd "${here}"
exec "${venv}/bin/python" -m pytest -q -p no:cacheprovider "$@" "${here}"

#!/usr/bin/env bash
# The test suite: set up, then pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
exec "${MMER_VENV:-$root/.venv}/bin/python" -m pytest -q "$@"

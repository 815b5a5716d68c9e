#!/usr/bin/env bash
# The main job: set up, then the default benchmark on the embedded offline data.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
exec "${MMER_VENV:-$root/.venv}/bin/mmer-cl" run "$@"

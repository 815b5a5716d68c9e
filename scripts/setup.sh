#!/usr/bin/env bash
# Idempotent set-up: Debian data packages, a virtual environment, the package and its test
# extras. Quick the second time: the venv is reused while pyproject.toml is unchanged.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MMER_VENV:-$root/.venv}
debs="dataset-fashion-mnist espeak-ng wordnet-base"

missing=()
for p in $debs; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: the data needs Debian packages ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

stamp="$venv/.mmer-deps-$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: building the virtual environment in $venv (about 6 GB, a few minutes the first time)"
  python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -e "$root[test]"
  rm -f "$venv"/.mmer-deps-* && touch "$stamp"
else
  # Cheap: re-point the editable install at this clone, dependencies are already there.
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps -e "$root" >/dev/null
fi

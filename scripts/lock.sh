#!/usr/bin/env bash
# Refreshes requirements.lock: the exact versions of every dependency of `.[test]` (and of the
# extras named in EXTRAS), resolved for Python >= 3.12 on any platform. setup.sh and CI install
# from it; setup.py keeps the ranges for people who `pip install` the package.
# After refreshing: `make test` (a fresh .venv is rebuilt because the lock changed), `make demo`,
# then commit requirements.lock with a note of what moved (`git diff requirements.lock`).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || bash scripts/setup.sh
"$venv/bin/python" -m pip install --quiet "uv>=0.9,<1"
extras=${EXTRAS:-test}
args=()
for e in ${extras//,/ }; do args+=(--extra "$e"); done
"$venv/bin/python" -m uv pip compile setup.py "${args[@]}" --universal --python-version 3.12 \
  --quiet --custom-compile-command "make lock" -o requirements.lock
echo "lock: wrote requirements.lock ($(grep -c '==' requirements.lock) pinned packages)"

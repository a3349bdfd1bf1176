#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs the exact versions of requirements.lock, then
# the package itself (editable, without resolving dependencies again). Re-running is cheap: the
# install is skipped while setup.py and the lock are unchanged. `make lock` refreshes the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  py=$(bash scripts/find_python.sh)
  echo "setup: creating $venv with $py"
  rm -rf "$venv"
  "$py" -m venv "$venv"
fi
stamp="$venv/.opdplus_installed"
want=$(cat setup.py requirements.lock | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r requirements.lock
  "$venv/bin/python" -m pip install --quiet --no-deps -e .
  "$venv/bin/python" -m pip check
  echo "$want" > "$stamp"
fi
"$venv/bin/python" -c 'import jax, flax; print(f"setup: jax {jax.__version__}, flax {flax.__version__}, python", __import__("sys").version.split()[0])'

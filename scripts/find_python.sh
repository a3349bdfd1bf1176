#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter, trying candidates in order; exits 1 if none.
# jax >= 0.11 needs Python >= 3.12. Set PYTHON=/path/to/python to choose one explicitly.
set -u
ok() { "$1" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
candidates+=(python3.13 python3.12 python3 python)
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])' | sort -rV); do
    p=$(pyenv prefix "$v" 2>/dev/null) && candidates+=("$p/bin/python3")
  done
fi
candidates+=(/usr/local/bin/python3.13 /usr/local/bin/python3.12 /usr/bin/python3.13 /usr/bin/python3.12)
for c in "${candidates[@]}"; do
  p=$(command -v "$c" 2>/dev/null) || continue
  if ok "$p"; then
    "$p" -c 'import sys; print(sys.executable)'
    exit 0
  fi
done
echo "find_python: no Python >= 3.12 found (tried: ${candidates[*]}). Install one, or set PYTHON=/path/to/python3.12." >&2
exit 1

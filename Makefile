# Two commands for a fresh machine: `make demo` and `make test`. Both create or refresh .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
DATA_BIN := data-bin/kjv_web
# A new directory per demo run, so an earlier run's checkpoints are never overwritten.
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test test-unit test-fast venv preprocess

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The test suite also runs the DeepSpeed backend on the CPU, and converts from the real torchscale and fairseq
# (requirements-peers.txt: without their dependency resolver, so the project's torch stays); the demo needs none.
$(DEV_STAMP): $(STAMP) requirements-dev.txt requirements-peers.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -r requirements-peers.txt
	touch $(DEV_STAMP)

$(DATA_BIN)/meta.json: $(STAMP)
	$(VENV)/bin/megabranch-preprocess --source-lang kjv --target-lang web \
	  --trainpref data/kjv_web/train --validpref data/kjv_web/valid --testpref data/kjv_web/test \
	  --destdir $(DATA_BIN) --vocab-size 8000

preprocess: $(DATA_BIN)/meta.json

# Trains a tiny deep BranchNorm model for a few minutes on the CPU, then scores the held-out test split.
demo: $(DATA_BIN)/meta.json
	$(VENV)/bin/megabranch-train --config configs/demo.yaml --set log.save_dir=$(DEMO_DIR)
	$(VENV)/bin/megabranch-generate --checkpoint $(DEMO_DIR)/best --split test --beam 4 --copy-baseline

# DeepSpeed's CPU communication op is JIT-built once (about 40 s) into .cache/ and reused by later runs.
PYTEST := TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions $(PY) -m pytest -q
test: $(DEV_STAMP)
	$(PYTEST) tests

# For developers: the in-process tests under about 10 s each (no gloo workers, torchrun or deepspeed launcher),
# or everything but the slow ones (markers in pytest.ini).
test-unit: $(DEV_STAMP)
	$(PYTEST) -m "unit and not slow" tests

test-fast: $(DEV_STAMP)
	$(PYTEST) -m "not slow" tests


# Two commands for a fresh machine: `make demo` and `make test`. Both create or refresh .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQ_STAMP := $(VENV)/.installed-requirements
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
DATA_BIN := data-bin/kjv_web
EN_ES := data-bin/en_es
EN_ES_MULTI := data-bin/en_es_multi
# The demos train on one CPU thread unless OMP_NUM_THREADS says otherwise: with torch's default of one thread per
# core, OpenMP's barriers spin-wait for a core another process holds, and a step gets 10-20x slower as soon as
# anything else runs (README, "Quick start"); one thread costs far less than that when the machine is idle.
DEMO_ENV := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}
# A new directory per demo run, so an earlier run's checkpoints are never overwritten.
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)
MULTI_DIR := runs/demo-multilingual-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo demo-multilingual test test-unit test-fast lint venv dev-env preprocess

venv: $(STAMP)

$(REQ_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $(REQ_STAMP)

# The package itself; setup.py compiles its fused C++ kernels here (about 40 s on one core).
$(STAMP): $(REQ_STAMP) setup.py
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The test suite also runs the DeepSpeed backend on the CPU, and converts from the real torchscale and fairseq
# (requirements-peers.txt: without their dependency resolver, so the project's torch stays); the demo needs none.
# READTHEDOCS=1 is fairseq's own switch to skip its C++/Cython extensions (a 2-minute build on 2 cores that
# nothing here uses: megabranch calls fairseq's models and SequenceGenerator, not its compiled helpers).
$(DEV_STAMP): $(REQ_STAMP) requirements-dev.txt requirements-peers.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	READTHEDOCS=1 $(PY) -m pip install -q --no-deps --no-build-isolation -r requirements-peers.txt
	touch $(DEV_STAMP)

# Everything the tests need: the kernels compile on one core while pip installs the test tools on the other.
dev-env: $(REQ_STAMP)
	$(MAKE) --no-print-directory -j2 $(STAMP) $(DEV_STAMP)

$(DATA_BIN)/meta.json: $(STAMP)
	$(VENV)/bin/megabranch-preprocess --source-lang kjv --target-lang web \
	  --trainpref data/kjv_web/train --validpref data/kjv_web/valid --testpref data/kjv_web/test \
	  --destdir $(DATA_BIN) --vocab-size 8000 --overwrite

# The real pair data/en_es (WEB -> Reina-Valera 1909): en -> es alone (configs/translate.yaml), and both
# directions in one directory with target-language tags (configs/multilingual_demo.yaml).
$(EN_ES)/meta.json: $(STAMP)
	$(VENV)/bin/megabranch-preprocess --source-lang en --target-lang es \
	  --trainpref data/en_es/train --validpref data/en_es/valid --testpref data/en_es/test \
	  --destdir $(EN_ES) --vocab-size 8000 --overwrite

$(EN_ES_MULTI)/meta.json: $(STAMP)
	$(VENV)/bin/megabranch-preprocess --pairs en-es,es-en \
	  --trainpref data/en_es/train --validpref data/en_es/valid --testpref data/en_es/test \
	  --destdir $(EN_ES_MULTI) --vocab-size 8000 --overwrite

preprocess: $(DATA_BIN)/meta.json $(EN_ES)/meta.json $(EN_ES_MULTI)/meta.json

# Trains a tiny deep BranchNorm model for a few minutes on the CPU, then scores the held-out test split.
demo: $(DATA_BIN)/meta.json
	$(DEMO_ENV) $(VENV)/bin/megabranch-train --config configs/demo.yaml --set log.save_dir=$(DEMO_DIR)
	$(DEMO_ENV) $(VENV)/bin/megabranch-generate --checkpoint $(DEMO_DIR)/best --split test --beam 4 --copy-baseline

# One model for English -> Spanish and Spanish -> English (under 30 min on the CPU); BLEU per direction.
demo-multilingual: $(EN_ES_MULTI)/meta.json
	$(DEMO_ENV) $(VENV)/bin/megabranch-train --config configs/multilingual_demo.yaml --set log.save_dir=$(MULTI_DIR)
	$(DEMO_ENV) $(VENV)/bin/megabranch-generate --checkpoint $(MULTI_DIR)/best --split test --beam 4 --copy-baseline

# The suite runs in TEST_JOBS pytest-xdist workers (default: the CPU count, at most 4), one torch thread each
# (tests/conftest.py); --dist worksteal: an idle worker takes tests queued on another, so the slowest test file
# does not decide when the run ends. TEST_JOBS=0 runs it in this process, as plain pytest does.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
# Compiled extensions and inductor's kernel cache live in the clone's .cache/, not in ~/.cache or /tmp: a fresh
# clone measures what CI pays, and a second run in the same clone reuses them.
PYTEST := OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions \
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.cache/inductor $(PY) -m pytest -q \
	$(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist worksteal)
test: lint
	$(PYTEST) tests

# ruff (lint and format) and mypy over the typed core, as configured in pyproject.toml; `make test` runs it first.
lint: dev-env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# For developers: the in-process tests under about 10 s each (no gloo workers, torchrun or deepspeed launcher),
# or everything but the slow ones (markers in pytest.ini).
test-unit: dev-env
	$(PYTEST) -m "unit and not slow" tests

test-fast: dev-env
	$(PYTEST) -m "not slow" tests


# `make demo` and `make test` work on a fresh machine: both (re)build .venv from requirements.txt if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline always: no weights or data are downloaded at run time.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export WANDB_SILENT := true
export PYTHONPATH := $(CURDIR)

.PHONY: install test demo grid clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --no-cache-dir -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

# The demo runs on the GPU when torch sees one (trainer=gpu: bf16-mixed), else with the CPU defaults.
DEMO_TRAINER = $(shell $(PY) -c "import torch; print('trainer=gpu' if torch.cuda.is_available() else '')")

demo: install
	$(PY) train.py stage=pipeline experiment=toy_quick $(DEMO_TRAINER)

grid: install
	$(PY) scripts/toyfaces_grid.py --out docs/toyfaces_grid.png

clean:
	rm -rf outputs

# Two commands do everything on a fresh machine:
#   make run    set up .venv and train a Smooth-LoRA on the toy world (CPU, minutes)
#   make test   set up .venv with the test oracles and run the test suite
PYTHON ?= python3
TORCH  ?= torch==2.13.0
LPIPS_ORACLE := torchvision==0.29.1 lpips==0.1.4
VENV   := .venv
PY     := $(VENV)/bin/python

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	# LPIPS oracle for tests/test_metrics.py, kept off the venv's path (see that file for why)
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/lpips-oracle $(LPIPS_ORACLE)
	touch $@

setup: $(VENV)/.runtime

run: $(VENV)/.runtime
	$(PY) train.py
	$(PY) sampler.py

test: $(VENV)/.dev
	$(PY) -m pytest -q tests

.PHONY: setup run test

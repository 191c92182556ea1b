# Quick start: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision pinned here so pip takes the local wheels instead of a multi-GB download
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev,ray,timm,lightning,wandb]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/initscope demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/plan_speed.py
	$(PY) benchmarks/probe_speed.py
	$(PY) benchmarks/train_speed.py --threads 1
	$(PY) benchmarks/cli_start.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .hypothesis

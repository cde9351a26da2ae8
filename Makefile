# Two commands a new user needs:  make demo  |  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.core-installed
DEV := $(VENV)/.dev-installed
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: setup setup-dev demo test lint bench clean browser

# The library, matplotlib for the reports, and torch pinned to the CPU build on local disk.
$(CORE): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[plot]'
	touch $(CORE)

# Everything the tests compare against (keras, lightning, transformers, tensorboard, pandas).
$(DEV): $(CORE)
	$(PIP) -e '.[dev]'
	touch $(DEV)

setup: $(CORE)
setup-dev: $(DEV)

demo: setup
	$(BIN)/stablestep lab run all --out runs/demo

# Chromium renders the HTML report in one test; Debian's package, installed when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"; }

test: setup-dev browser
	$(BIN)/python -m pytest

# Each benchmark prints its ratio against the anchor measured in the same run on its last line.
bench: setup-dev
	$(PIP) -e '.[dev,bench]'
	@for b in optim_step monitor_overhead model_probes secant curvature readers detection wild guard; do \
	  echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py | tail -n 1; done

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache

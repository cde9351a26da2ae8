# Two commands a new user needs:  make demo  |  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean browser

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/stablestep lab run all --out runs/demo

# Chromium renders the HTML report in one test; Debian's package, installed when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"; }

test: setup browser
	$(BIN)/python -m pytest

# Each benchmark prints its ratio against the anchor measured in the same run on its last line.
bench: setup
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,bench]'
	@for b in optim_step monitor_overhead curvature detection guard; do \
	  echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py | tail -n 1; done

lint: setup
	$(BIN)/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache

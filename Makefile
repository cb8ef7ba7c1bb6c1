# Every target that needs Python goes through $(VENV); `setup` is idempotent: it reinstalls only when
# pyproject.toml changed since the last install (stamp file), so `make test` on a set-up tree starts at once.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: setup test demo bench bench-data lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

demo: setup
	$(PY) jobs/demo.py

bench: bench-data

bench-data: setup
	$(PY) benchmarks/bench_data.py

lint: setup
	$(VENV)/bin/ruff check pipeline jobs tests benchmarks
	$(VENV)/bin/ruff format --check pipeline jobs tests benchmarks

clean:
	rm -rf .cache build *.egg-info .pytest_cache

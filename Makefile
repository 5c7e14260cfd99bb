# `make demo`: set up and run the main job; `make test`: set up and run the test suite.
VENV ?= .venv
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast clean
setup:
	@scripts/install.sh

demo: setup
	$(VENV)/bin/fuxi train --preset cpu-demo

test: setup
	$(VENV)/bin/python -m pytest -q

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow"

clean:
	rm -rf runs mlflow.db mlruns .pytest_cache

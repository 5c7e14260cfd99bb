# `make demo`: set up and run the main job; `make test`: set up and run both test tiers.
VENV ?= .venv
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-unit test-integration loss-curves lint clean
setup:
	@scripts/install.sh

demo: setup
	$(VENV)/bin/fuxi train --preset cpu-demo

# Two tiers (tests/README.md): unit (no training run, no process, server or cluster; under 2 minutes in
# all) and integration (training runs, torchrun, Ray, MLflow, HTTP). CI runs both.
test: setup
	$(VENV)/bin/python -m pytest -q tests

test-unit: setup
	$(VENV)/bin/python -m pytest -q tests/unit

test-integration: setup
	$(VENV)/bin/python -m pytest -q tests/integration

# rewrite tests/assets/losses/*.txt after a change meant to alter numerics (tests/integration/test_loss_curve.py)
loss-curves: setup
	FUXI_UPDATE_LOSS_CURVES=1 $(VENV)/bin/python -m pytest -q tests/integration/test_loss_curve.py

clean:
	rm -rf runs mlflow.db mlruns .pytest_cache

# Lint gate (CI runs it before the tests): ruff lint + format check over the repo, pyrefly over the
# model, the data path and the training path (scope: [tool.pyrefly] in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyrefly check

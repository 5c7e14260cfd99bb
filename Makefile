# `make demo`: set up and run the main job; `make test`: set up and run both test tiers.
VENV ?= .venv
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-unit test-integration loss-curves lint clean box-install box-up box-down box-test
setup:
	@scripts/install.sh

demo: setup
	$(VENV)/bin/fuxi train --preset cpu-demo

# Two tiers (tests/README.md): unit (no training run, no process, server or cluster; under 2 minutes in
# all) and integration (training runs, torchrun, Ray, MLflow, HTTP). CI runs both.
test: setup
	$(VENV)/bin/python -m pytest -q --durations=20 tests

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
# model, the data and training paths, serving and storage (scope: [tool.pyrefly] in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyrefly check

# Cluster in a box (infra/box/README.md): hosts as network namespaces on this machine, Slurm + slurmdbd,
# Ray, the MLflow server on PostgreSQL. Root only.
box-install:
	@infra/box/install.sh

box-up: setup box-install
	@infra/box/box.sh up

box-down:
	@infra/box/box.sh down

# box up, 2-host training parity, the build on the Ray cluster, a lost-host drill, box down
box-test: setup box-install
	@infra/box/box_test.sh

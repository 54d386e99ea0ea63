# Two entry points (see README): `make run` (set up + the main job), `make test` (set up + tests).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test test-all lint bench-comm bench-attention

setup:
	@bash tools/bootstrap.sh

run: setup
	.venv/bin/streamfusion run

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest --run-slow $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check packages tests tools
	.venv/bin/ruff format --check packages tests tools
	.venv/bin/mypy packages/sf-comm/src packages/sf-attn/src packages/sf-models/src packages/sf-compile/src

bench-comm: setup
	.venv/bin/streamfusion bench comm

bench-attention: setup
	.venv/bin/streamfusion bench attention

# Two entry points (see README): `make run` (set up + the main job), `make test` (set up + tests).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup run run-strategies test test-all lint bench-comm bench-attention

setup:
	@bash tools/bootstrap.sh

# The main job: a tiny Flux pipeline directory (random weights, local tokenizers; made once),
# then a prompt -> image on 4 CPU ranks emulating 2 machines x 2 GPUs, checked against
# single-process diffusers on the same directory, prompt and seed.
TINY := out/tiny-flux
run: setup
	@test -f $(TINY)/model_index.json || .venv/bin/streamfusion make-tiny $(TINY) --model flux
	.venv/bin/streamfusion generate --model-dir $(TINY) --prompt "a red fox in the snow, watercolor" \
	  --seed 0 --world 4 --topology 2x2 --out out/fox.png --json out/generate.json --check

# The transformer alone, every strategy side by side, checked against one process.
run-strategies: setup
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

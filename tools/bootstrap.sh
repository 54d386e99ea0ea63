#!/usr/bin/env bash
# Create .venv and install StreamFusion for development on a fresh machine.
#
# torch is installed first and pinned: an unpinned or wider requirement lets pip pick a
# multi-GB CUDA build, while torch==2.13.0 resolves to the CPU wheel on this machine.
# Re-running is cheap: a stamp file skips the install when nothing it depends on changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SF_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.sf-bootstrap"
want=$(cat tools/bootstrap.sh pyproject.toml packages/*/pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0"
# Tested versions, pinned so CI (and the lint rules) do not move under us.
"${pip[@]}" "triton==3.7.1" "numpy>=1.26" "diffusers==0.42.1" "transformers==5.24.0" "einops>=0.8" \
  "accelerate==1.15.0" "imageio==2.38.1" "imageio-ffmpeg==0.8.1" \
  "hypothesis>=6.100" "pytest>=8" "pytest-xdist>=3.5" "pytest-timeout>=2.3" \
  "matplotlib>=3.8" "ruff==0.17.6" "mypy==2.4.1"
"${pip[@]}" -e packages/sf-comm -e packages/sf-attn -e packages/sf-models -e packages/sf-compile
echo "$want" > "$STAMP"

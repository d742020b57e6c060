# Worker image: the Celery worker, the scorer and `w2s models prepare`, with torch.
# TORCH_VARIANT=cuda (default) installs the CUDA build of torch; TORCH_VARIANT=cpu the CPU build.
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t w2s-anchor-worker .
#   docker build -f docker/worker.Dockerfile --build-arg TORCH_VARIANT=cpu -t w2s-anchor-worker-cpu .
# No model weights are copied in: models are mounted at /models (W2S_MODEL_DIR) at run time.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# torch 2.13.0 on PyPI for Linux x86_64 is the CUDA 13.0 build (it requires cuda-toolkit 13.0.3
# and nvidia-cudnn-cu13 from PyPI), which needs an NVIDIA driver of the 580 series or newer.
# For an older driver, set TORCH_INDEX_URL to a PyTorch index of an older CUDA release
# (for example https://download.pytorch.org/whl/cu128).
ARG TORCH_VARIANT=cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch goes in first: pyproject.toml only gives a range, which this build then satisfies.
RUN set -eu; \
    case "${TORCH_VARIANT}" in \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      *) echo "invalid TORCH_VARIANT '${TORCH_VARIANT}': expected cuda or cpu" >&2; exit 1 ;; \
    esac; \
    pip install --index-url "${index}" "torch==${TORCH_VERSION}"; \
    python -c "import sys, torch; cuda = torch.version.cuda; print('torch', torch.__version__, 'CUDA', cuda); sys.exit(0 if (cuda is None) == ('${TORCH_VARIANT}' == 'cpu') else 'torch build does not match TORCH_VARIANT=${TORCH_VARIANT}')"

COPY docker/constraints.txt /tmp/build/
COPY pyproject.toml README.md /src/
COPY app /src/app
COPY workers /src/workers
COPY ml /src/ml
RUN pip install -c /tmp/build/constraints.txt "/src[s3]" "psycopg[binary]"


FROM ${PYTHON_IMAGE} AS runtime
ARG W2S_UID=10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/cache/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Mount points are created here and owned by the service user, because Docker copies this
# ownership into a named volume the first time the volume is mounted.
RUN groupadd --system --gid "${W2S_UID}" w2s \
 && useradd --system --uid "${W2S_UID}" --gid w2s --home-dir /home/w2s --create-home --shell /usr/sbin/nologin w2s \
 && mkdir -p /artifacts /data /models /cache \
 && chown w2s:w2s /artifacts /data /models /cache

COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py docker/prepare-models.sh docker/constraints.txt requirements-models.txt /opt/w2s/

USER ${W2S_UID}:${W2S_UID}
WORKDIR /home/w2s
CMD ["celery", "-A", "workers.celery_app", "worker", "-Q", "gpu,cpu", "--concurrency", "1", "--prefetch-multiplier", "1", "--loglevel", "INFO"]

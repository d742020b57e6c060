# API image: the FastAPI job routes and the database migrations, without torch or CUDA.
# The job routes never import torch; scoring runs in the scorer service, built from
# docker/worker.Dockerfile. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t w2s-anchor-api .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, so that a source change reuses this layer.
COPY docker/requirements-api.txt docker/constraints.txt /tmp/build/
RUN pip install -r /tmp/build/requirements-api.txt -c /tmp/build/constraints.txt

# --no-deps: pyproject.toml lists torch and the ML stack, which this image leaves out.
COPY pyproject.toml README.md /src/
COPY app /src/app
COPY workers /src/workers
COPY ml /src/ml
RUN pip install --no-deps /src


FROM ${PYTHON_IMAGE} AS runtime
ARG W2S_UID=10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1

# Mount points are created here and owned by the service user, because Docker copies this
# ownership into a named volume the first time the volume is mounted.
RUN groupadd --system --gid "${W2S_UID}" w2s \
 && useradd --system --uid "${W2S_UID}" --gid w2s --home-dir /home/w2s --create-home --shell /usr/sbin/nologin w2s \
 && mkdir -p /artifacts /data /models /cache \
 && chown w2s:w2s /artifacts /data /models /cache

COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/w2s/healthcheck.py

USER ${W2S_UID}:${W2S_UID}
WORKDIR /home/w2s
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "/opt/w2s/healthcheck.py", "http://127.0.0.1:8000/v1/health/live"]
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]

# syntax=docker/dockerfile:1
#
# The neuronshap image: one image for the API (the default command), the
# Celery worker (`neuronshap worker`) and the one-shot `neuronshap migrate`.
#
#   docker build -t neuronshap .                       # CPU torch (default)
#   docker build -t neuronshap-gpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# A CUDA index's torch wheels bring their own CUDA libraries (as pip
# packages), so the same slim base serves a GPU worker; the host needs only
# the NVIDIA driver and the NVIDIA Container Toolkit. Pick an index that has
# the torch version below (see pytorch.org's install matrix).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build stage
# Builds a self-contained virtual environment in /opt/venv. pip's build
# requirements (setuptools, wheel), the source tree and any build artefacts
# stay in this stage.
FROM ${PYTHON_IMAGE} AS build

# Where torch comes from: the CPU-only index by default; a CUDA index
# (e.g. https://download.pytorch.org/whl/cu128) for a GPU image.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Must equal the torch pin in pyproject.toml (tests/test_deploy_files.py checks).
ARG TORCH_VERSION=2.13.0

# (No PYTHONDONTWRITEBYTECODE here: pip byte-compiles what it installs, so the
# final image starts without compiling torch's sources on every start.)
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# torch first, from its own index, in a layer of its own: it is by far the
# largest dependency and changes least often. `pip install .` below then finds
# pyproject's pin satisfied (a local version such as 2.13.0+cpu matches
# torch==2.13.0) and leaves it.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# Only what the package needs: pyproject.toml (and the README it names) and the
# four package trees. alembic.ini is not needed: `neuronshap migrate` finds
# migrations/ inside the installed package tree.
COPY pyproject.toml README.md ./
COPY app/ app/
COPY worker/ worker/
COPY neuronshap/ neuronshap/
COPY examples/ examples/
COPY migrations/ migrations/
RUN pip install --no-cache-dir .

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NEURONSHAP_DATA_DIR=/srv/data \
    NEURONSHAP_BLOB_DIR=/srv/blobs

# An unprivileged system user with fixed ids (so that volumes and
# Kubernetes' runAsNonRoot/runAsUser can rely on them). /srv/blobs and
# /srv/data exist, owned by it, so that a named volume mounted there for the
# first time takes this ownership.
RUN groupadd --system --gid 10001 neuronshap \
    && useradd --system --no-log-init --uid 10001 --gid neuronshap \
        --home-dir /srv --no-create-home --shell /usr/sbin/nologin neuronshap \
    && mkdir -p /srv/blobs /srv/data \
    && chown -R neuronshap:neuronshap /srv

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /srv

EXPOSE 8000

# Liveness of the API. python:3.11-slim has no curl: python's urllib fails
# (exit 1) on a refused connection, a timeout or a non-2xx status. Compose
# overrides this for the worker and the migrate job, which serve no HTTP.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["neuronshap", "serve", "--host", "0.0.0.0", "--port", "8000"]

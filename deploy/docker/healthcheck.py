"""Docker HEALTHCHECK for every loraplex image: exit 0 when the component answers, 1 when it does not.

HEALTHCHECK_TARGET picks the check: grpc://HOST:PORT asks grpc.health.v1 for the server ("") status;
http://HOST:PORT/PATH expects a 2xx answer. Kubernetes does not use this (see deploy/k8s probes).
"""

from __future__ import annotations

import os
import sys
import urllib.request

DEFAULT_TARGET = "grpc://127.0.0.1:50051"
TIMEOUT_S = 4.0


def grpc_serving(address: str) -> bool:
    """True when the server at address reports SERVING for the whole server ("")."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    """True when url answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def check(target: str) -> bool:
    if target.startswith("grpc://"):
        return grpc_serving(target.removeprefix("grpc://"))
    if target.startswith(("http://", "https://")):
        return http_ok(target)
    raise SystemExit(f"HEALTHCHECK_TARGET {target!r} is neither grpc://host:port nor an http(s):// URL")


if __name__ == "__main__":
    sys.exit(0 if check(os.environ.get("HEALTHCHECK_TARGET", DEFAULT_TARGET)) else 1)

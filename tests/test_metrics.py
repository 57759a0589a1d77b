"""The /metrics port every server opens: a port it cannot take is a clear error naming the flag."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry

from loraplex.protos.metrics import serve_metrics


def test_a_metrics_port_in_use_is_named_with_the_flag_to_change():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"127\.0\.0\.1:{port}.*--metrics-port"):
            serve_metrics(port, CollectorRegistry(), host="127.0.0.1")


def test_port_zero_serves_nothing():
    assert serve_metrics(0, CollectorRegistry()) == 0

"""Child processes for the local mesh (and the integration tests): start, wait until healthy, stop.

Children get PR_SET_PDEATHSIG, so even a SIGKILLed launcher leaves no orphans behind.
"""

from __future__ import annotations

import ctypes
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_PR_SET_PDEATHSIG = 1


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PICKED_PORT = 20000
_handed_out: set[int] = set()
_rng = random.Random()  # its own generator: tests that seed the global one get the same draws


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on host now, for a child process to bind soon; never the same one twice per process.

    Picked at random below the kernel's ephemeral range: ports in that range are what every outgoing
    connection gets, so one picked there (as bind to port 0 would) can be taken by some client's
    connection before the child binds it, which fails the child with 'Address already in use'.
    """
    low = _ephemeral_low()
    if low - _LOWEST_PICKED_PORT >= 1000:
        for _ in range(200):
            port = _rng.randrange(_LOWEST_PICKED_PORT, low)
            if port not in _handed_out and _bindable(host, port):
                _handed_out.add(port)
                return port
    while True:  # no room below the ephemeral range (or all taken): let the kernel choose
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range starts here; other systems use 49152 and up


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(command: Sequence[str], log_path: Path | None = None) -> subprocess.Popen:
    """Start a child that dies with us; its output goes to log_path (or is inherited)."""
    output = open(log_path, "ab") if log_path else None  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        list(command),
        stdout=output,
        stderr=subprocess.STDOUT if output else None,
        preexec_fn=_die_with_parent,
    )


def loraplex_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "loraplex.tools.cli", *args]


def start_redis(port: int, workdir: Path, log_path: Path | None = None) -> subprocess.Popen:
    """A private, non-persistent redis-server on 127.0.0.1:port; waits until it answers PING."""
    process = spawn(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        log_path,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}; is port {port} free?")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"redis-server on port {port} did not answer within 10 s")


def start_private_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    """start_redis on a free port, logging to workdir/redis.log; the process and its redis:// URL."""
    port = free_port()
    return start_redis(port, workdir, workdir / "redis.log"), f"redis://127.0.0.1:{port}/0"


def wait_serving(address: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
    """Block until the gRPC server at address reports SERVING; fail fast if its process exits."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server for {address} exited with code {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} was not SERVING within {timeout_s:.0f} s")


def wait_http_ok(url: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    """Block until GET url answers 200 (the gateway's /health); fail fast if its process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")


def stop_all(processes: Sequence[subprocess.Popen], timeout_s: float = 15) -> None:
    """SIGTERM each (in the given order), then SIGKILL whatever is still running after timeout_s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

"""Tensor-parallel ranks around start-up and stop: the process group's store listens on loopback only
and is gone after a stop, with every rank; a first rank that dies while the ranks are still starting
leaves none behind, and a first rank that gives up on its own start stops them quietly."""

from __future__ import annotations

import multiprocessing
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_tensor_parallel import _tp_children

from loraplex.shard.engine import Engine, EngineConfig

# a first rank that holds its ranks for the default two-minute collective timeout
_FIRST_RANK = """
import sys, time
from pathlib import Path
from loraplex.shard.engine import Engine, EngineConfig
Engine(Path(sys.argv[1]), EngineConfig(kv_cache_bytes=8 << 20, tp_size=2, tp_timeout_s=120))
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_first_rank_killed_while_its_ranks_start_leaves_none_behind(tiny_model_dir):
    """SIGKILL gives the first rank no chance to stop its ranks, and a rank still joining the process
    group waits on a store that is gone; it must notice its parent is gone, not linger for the
    collective timeout holding its memory (a GPU's, on a real shard)."""
    first = subprocess.Popen([sys.executable, "-c", _FIRST_RANK, str(tiny_model_dir)])
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not ranks and time.monotonic() < deadline:
            ranks = _tp_children(first.pid)
            time.sleep(0.05)
        assert ranks, "the first rank started its rank"
        time.sleep(0.5)  # the rank is importing torch or joining the process group
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _alive(ranks[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(ranks[0]), "the rank outlived the first rank"
    finally:
        first.kill()
        first.wait()
        for rank in ranks:
            if _alive(rank):
                subprocess.run(["kill", "-9", str(rank)], check=False)


def test_a_first_rank_that_fails_its_start_stops_the_ranks_without_an_error_of_theirs(tiny_model_dir, capfd):
    """The first rank's own error is the one to read: the ranks it stops before their set-up must not
    print a traceback of their own."""
    with pytest.raises(ValueError, match="KV cache budget holds no block"):
        Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=10, tp_size=2))
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def test_the_ranks_meet_on_loopback_only_and_a_stop_leaves_no_rank_or_port_behind(tiny_model_dir):
    """The store the ranks join runs for the shard's life and answers anyone who connects: on every
    interface, anyone who reaches the shard's machine (its pod, on Kubernetes) could write into the
    process group. 127.0.0.2 is loopback too, but a socket bound to 127.0.0.1 refuses it; one bound to
    every interface does not."""
    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20, tp_size=2))
    try:
        host, port = engine.peers._spec.rendezvous.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert _accepts("127.0.0.1", int(port)), "the store is up while the shard runs"
        assert not _accepts("127.0.0.2", int(port)), "the store listens beyond 127.0.0.1"
        (rank1,) = engine.peers._processes
    finally:
        engine.stop()
    assert rank1.exitcode == 0, "the rank stopped when asked"
    assert not multiprocessing.active_children()
    assert not _accepts("127.0.0.1", int(port)), "the store closed with the shard"

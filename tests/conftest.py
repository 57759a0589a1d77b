"""Shared fixtures: the real SmolLM2 files, a tiny random model, and a private real redis-server."""

from __future__ import annotations

import os

# Triton decides between compiling and interpreting when it is first imported, and torch, peft or
# transformers may import it before any kernel test runs: choose here. On a GPU machine run the suite
# with TRITON_INTERPRET=0 to compile the kernels for real.
os.environ.setdefault("TRITON_INTERPRET", "1")

from loraplex.tools.runtime_env import missing_defaults

# the processes' gRPC and OpenMP settings, before either loads (runtime_env says why)
os.environ.update(missing_defaults())

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex.tools.model_store import DEFAULT_MODEL, default_cache_dir, prepare_model
from loraplex.tools.processes import free_port, start_redis, stop_all
from loraplex.tools.tiny_model import write_tiny_model


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE_DIR", default_cache_dir()))


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir: Path) -> Path:
    """The embedded SmolLM2-135M-Instruct as safetensors (prepared once into the cache)."""
    return prepare_model(DEFAULT_MODEL, cache_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer, hidden-64 random Llama with SmolLM2's tokenizer: fast, real code paths."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH; the README's test command installs it")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process: subprocess.Popen = start_redis(port, workdir, workdir / "redis.log")
    yield f"redis://127.0.0.1:{port}/0"
    stop_all([process])


class RestartableRedis:
    """A private redis-server this test may restart on the same port (non-persistent: it forgets)."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._port = free_port()
        self._starts = 0
        self._process = self._start()
        self.url = f"redis://127.0.0.1:{self._port}/0"

    def restart(self) -> None:
        stop_all([self._process])
        self._process = self._start()

    def stop(self) -> None:
        stop_all([self._process])

    def _start(self) -> subprocess.Popen:
        self._starts += 1
        return start_redis(self._port, self._workdir, self._workdir / f"redis-{self._starts}.log")


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    redis = RestartableRedis(tmp_path)
    yield redis
    redis.stop()


@pytest.fixture
def namespace() -> str:
    """A fresh key prefix, so tests sharing one Redis never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:8]}"

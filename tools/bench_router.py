"""`loraplex bench router`: what one router process adds over calling a shard directly, in one run.

Stand-in shards answer every Generate at once with a few small chunks, so the figures are the router's
own cost (a gRPC hop, placement, forwarding) and not a model's. Latency: sequential streams, direct
and routed alternating request by request so that both see the same machine noise. Throughput: many
concurrent streams from several client processes for a fixed time, through the router and, as the
ceiling, straight to the same stand-in shards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import queue
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc

from loraplex.protos.v1 import common_pb2, generation_pb2_grpc, shard_pb2, shard_pb2_grpc
from loraplex.tools.bench_router_report import LoadRun, build_report, summary_table, write_report
from loraplex.tools.bench_stand_in_shard import BASE_MODEL, stand_in_command
from loraplex.tools.processes import (
    free_port,
    loraplex_command,
    spawn,
    start_private_redis,
    stop_all,
    wait_serving,
)

REQUEST = common_pb2.GenerateRequest(prompt="hi")
CALL_TIMEOUT_S = 30.0  # every call carries a deadline, as real clients' do; the router passes it on


@dataclass(frozen=True)
class RouterBenchConfig:
    num_shards: int = 2
    num_chunks: int = 4  # chunks each stand-in Generate streams back
    num_latency_requests: int = 2000  # per path, after the warm-up
    num_warmup_requests: int = 200
    concurrency: int = 128  # streams in flight at once in the throughput runs, over all client processes
    num_client_processes: int = 2
    throughput_warmup_s: float = 1.0  # load before the measured window, not counted
    throughput_duration_s: float = 10.0
    redis_url: str | None = None  # default: a private redis-server for the run
    output_dir: Path = Path("bench/results")

    def __post_init__(self) -> None:
        # checked before anything starts: the report needs latencies of both paths and a window with
        # streams in it, and would otherwise fail only after the whole run
        counts = {
            "num_shards": self.num_shards,
            "num_chunks": self.num_chunks,
            "num_latency_requests": self.num_latency_requests,
            "concurrency": self.concurrency,
            "num_client_processes": self.num_client_processes,
        }
        if too_few := [name for name, value in counts.items() if value < 1]:
            raise ValueError(f"{', '.join(too_few)} must be >= 1")
        if self.num_warmup_requests < 0 or self.throughput_warmup_s < 0 or not self.throughput_duration_s > 0:
            raise ValueError("warm-up requests and seconds must be >= 0, and the measured duration > 0")


@dataclass(frozen=True)
class RouterBenchResult:
    report: dict
    json_path: Path
    png_path: Path


@dataclass(frozen=True)
class _Mesh:
    router_address: str
    shard_addresses: tuple[str, ...]
    pids: dict[str, int]  # "router" and each shard id -> pid, for CPU accounting


def run_router_bench(config: RouterBenchConfig) -> RouterBenchResult:
    """Start redis, the stand-in shards and one router; measure latency then throughput; write the report."""
    started = datetime.now().astimezone()
    with _running_mesh(config) as mesh:
        direct_s, routed_s = asyncio.run(
            measure_latency(mesh, config.num_latency_requests, config.num_warmup_requests)
        )
        loads = [run_load("direct", mesh, config), run_load("routed", mesh, config)]
    report = build_report(config, started, direct_s, routed_s, loads)
    json_path, png_path = write_report(report, config.output_dir)
    return RouterBenchResult(report, json_path, png_path)


# --- the mesh under test ---------------------------------------------------------------------------


@contextlib.contextmanager
def _running_mesh(config: RouterBenchConfig) -> Iterator[_Mesh]:
    """Shards are registered (they report SERVING only after their first heartbeat) before the router
    starts, so its first snapshot already has them; everything is stopped in reverse order."""
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-router-") as workdir:
        processes = []
        try:
            redis_url = config.redis_url
            if redis_url is None:
                redis, redis_url = start_private_redis(Path(workdir))
                processes.append(redis)
            namespace = f"bench-router-{uuid.uuid4().hex[:8]}"
            shards = {}
            for index in range(config.num_shards):
                name, address = f"s{index}", f"127.0.0.1:{free_port()}"
                command = stand_in_command(name, address, redis_url, namespace, config.num_chunks)
                processes.append(spawn(command, Path(workdir, f"{name}.log")))
                shards[name] = (address, processes[-1])
            for name, (address, process) in shards.items():
                _wait_serving(address, process, Path(workdir, f"{name}.log"))
            router_address = f"127.0.0.1:{free_port()}"
            router_args = ["--redis-url", redis_url, "--namespace", namespace, "--model", BASE_MODEL]
            router_args += ["--port", router_address.rsplit(":", 1)[1], "--log-level", "WARNING"]
            processes.append(spawn(loraplex_command("router", *router_args), Path(workdir, "router.log")))
            _wait_serving(router_address, processes[-1], Path(workdir, "router.log"))
            pids = {
                "router": processes[-1].pid,
                **{name: process.pid for name, (_, process) in shards.items()},
            }
            yield _Mesh(router_address, tuple(address for address, _ in shards.values()), pids)
        finally:
            stop_all(processes[::-1])  # the router first, redis last


def _wait_serving(address: str, process, log_path: Path) -> None:
    try:
        wait_serving(address, process, timeout_s=60)
    except (RuntimeError, TimeoutError) as error:
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        raise RuntimeError(f"{error}; its log ends:\n{tail}") from error


# --- clients ---------------------------------------------------------------------------------------


def _opener(target: str, channel: grpc.aio.Channel) -> Callable[[], grpc.aio.UnaryStreamCall]:
    if target == "routed":
        generation = generation_pb2_grpc.GenerationStub(channel)
        return lambda: generation.GenerateStream(REQUEST, timeout=CALL_TIMEOUT_S)
    shard = shard_pb2_grpc.ShardStub(channel)
    shard_request = shard_pb2.ShardGenerateRequest(request=REQUEST)
    return lambda: shard.Generate(shard_request, timeout=CALL_TIMEOUT_S)


async def _stream(open_call: Callable[[], grpc.aio.UnaryStreamCall]) -> None:
    async for _ in open_call():
        pass


async def _timed(open_call: Callable[[], grpc.aio.UnaryStreamCall]) -> float:
    start = time.perf_counter()
    await _stream(open_call)
    return time.perf_counter() - start


async def measure_latency(mesh: _Mesh, num_requests: int, num_warmup: int) -> tuple[list[float], list[float]]:
    """Seconds from call to last chunk, one stream at a time: direct (shards in turn), then routed."""
    channels = [grpc.aio.insecure_channel(address) for address in mesh.shard_addresses]
    router_channel = grpc.aio.insecure_channel(mesh.router_address)
    try:
        direct = [_opener("direct", channel) for channel in channels]
        routed = _opener("routed", router_channel)
        direct_s, routed_s = [], []
        for i in range(num_warmup + num_requests):
            pair = (await _timed(direct[i % len(direct)]), await _timed(routed))
            if i >= num_warmup:
                direct_s.append(pair[0])
                routed_s.append(pair[1])
        return direct_s, routed_s
    finally:
        for channel in [*channels, router_channel]:
            await channel.close()


def run_load(target: str, mesh: _Mesh, config: RouterBenchConfig) -> LoadRun:
    """`concurrency` closed-loop streams over `num_client_processes` spawned processes, which start
    together at a barrier once connected; CPU time of the router and the shards is taken over the
    measured window."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that has used gRPC
    barrier = context.Barrier(config.num_client_processes + 1)
    results = context.Queue()
    addresses = (mesh.router_address,) if target == "routed" else mesh.shard_addresses
    window = (config.throughput_warmup_s, config.throughput_duration_s)
    clients = [
        context.Process(target=_client_process, args=(target, addresses, streams, window, barrier, results))
        for streams in _split(config.concurrency, config.num_client_processes)
    ]
    for client in clients:
        client.start()
    try:
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError as error:
            reason = "it did not reach the start within 120 s"
            with contextlib.suppress(queue.Empty):
                reason = results.get(timeout=5)
            raise RuntimeError(
                f"{target} load: a client process failed before the start: {reason}"
            ) from error
        time.sleep(config.throughput_warmup_s)
        cpu_before = {name: _cpu_seconds(pid) for name, pid in mesh.pids.items()}
        time.sleep(config.throughput_duration_s)
        cpu_s = {name: _cpu_seconds(pid) - cpu_before[name] for name, pid in mesh.pids.items()}
        outcomes = [results.get(timeout=60) for _ in clients]
    finally:
        for client in clients:
            client.join(timeout=10)
            if client.is_alive():
                client.kill()
    if failed := [o["failed"] for o in outcomes if "failed" in o]:
        raise RuntimeError(f"{target} load: {len(failed)} client processes failed, first: {failed[0]}")
    errors = sum((Counter(o["errors"]) for o in outcomes), Counter())
    latencies = [s for o in outcomes for s in o["latencies_s"]]
    return LoadRun(
        target, config.concurrency, len(clients), config.throughput_duration_s, latencies, errors, cpu_s
    )


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of pid so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _client_process(target, addresses, num_streams, window, barrier, results) -> None:
    try:
        results.put(asyncio.run(_client_load(target, addresses, num_streams, window, barrier)))
    except Exception as error:  # reported to the parent, which raises it
        barrier.abort()
        results.put({"failed": f"{type(error).__name__}: {error}"})


async def _client_load(target: str, addresses, num_streams: int, window, barrier) -> dict:
    """Each task opens its next stream as soon as the last one ends; streams that finish inside the
    measured window count, whenever they started."""
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    try:
        openers = [_opener(target, channel) for channel in channels]
        for open_call in openers:
            await _stream(open_call)  # connected and warm before the clock starts
        await asyncio.to_thread(barrier.wait, 120)
        measure_from = time.perf_counter() + window[0]
        measure_until = measure_from + window[1]
        latencies_s: list[float] = []
        errors: Counter[str] = Counter()

        async def closed_loop(open_call) -> None:
            while (start := time.perf_counter()) < measure_until:
                try:
                    await _stream(open_call)
                except grpc.aio.AioRpcError as error:
                    errors[error.code().name] += 1
                    continue
                end = time.perf_counter()
                if measure_from <= end <= measure_until:
                    latencies_s.append(end - start)

        await asyncio.gather(*(closed_loop(openers[i % len(openers)]) for i in range(num_streams)))
        return {"latencies_s": latencies_s, "errors": dict(errors)}
    finally:
        for channel in channels:
            await channel.close()


# --- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags, for the `loraplex bench router` command; defaults are RouterBenchConfig's."""
    defaults = RouterBenchConfig()
    parser.add_argument("--shards", type=int, default=defaults.num_shards, help="stand-in shards")
    parser.add_argument("--chunks", type=int, default=defaults.num_chunks, help="chunks per stream")
    parser.add_argument("--latency-requests", type=int, default=defaults.num_latency_requests)
    parser.add_argument("--warmup-requests", type=int, default=defaults.num_warmup_requests)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="streams in flight")
    parser.add_argument("--clients", type=int, default=defaults.num_client_processes, help="client processes")
    parser.add_argument("--warmup-s", type=float, default=defaults.throughput_warmup_s)
    parser.add_argument("--duration-s", type=float, default=defaults.throughput_duration_s)
    parser.add_argument("--redis-url", default=None, help="default: a private redis-server for the run")
    parser.add_argument("--output-dir", type=Path, default=defaults.output_dir)


def run_from_args(args: argparse.Namespace) -> int:
    """Run with add_arguments' flags, print the table and where the report went; the exit code."""
    config = RouterBenchConfig(
        num_shards=args.shards,
        num_chunks=args.chunks,
        num_latency_requests=args.latency_requests,
        num_warmup_requests=args.warmup_requests,
        concurrency=args.concurrency,
        num_client_processes=args.clients,
        throughput_warmup_s=args.warmup_s,
        throughput_duration_s=args.duration_s,
        redis_url=args.redis_url,
        output_dir=args.output_dir,
    )
    result = run_router_bench(config)
    print(summary_table(result.report))
    print(f"wrote {result.json_path} and {result.png_path}")
    return 0

"""Starts real mesh processes (shards, routers) on free loopback ports: for integration tests and for
benchmarks that run a private mesh."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.tools.processes import free_port, loraplex_command, spawn, stop_all, wait_serving


@dataclass
class Mesh:
    router: str  # the first router's address
    shards: dict[str, str]  # shard id -> address
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # name -> process
    routers: list[str] = field(default_factory=list)  # every router's address

    def stop(self) -> None:
        stop_all(list(self.processes.values())[::-1])


def start_mesh(
    model_dir: Path,
    redis_url: str,
    namespace: str,
    logdir: Path,
    num_shards: int = 2,
    heartbeat_ttl: float = 3,
    shard_args: tuple[str, ...] = (),
    num_routers: int = 1,
    router_args: tuple[str, ...] = (),
) -> Mesh:
    common = ["--model", str(model_dir), "--redis-url", redis_url, "--namespace", namespace]
    mesh = Mesh(router=f"127.0.0.1:{free_port()}", shards={})
    try:
        for index in range(num_shards):
            shard_id, address = f"shard-{index}", f"127.0.0.1:{free_port()}"
            command = loraplex_command(
                "shard",
                *common,
                "--shard-id",
                shard_id,
                "--port",
                address.split(":")[1],
                "--heartbeat-ttl",
                str(heartbeat_ttl),
                *shard_args,
            )
            mesh.processes[shard_id] = spawn(command, logdir / f"{shard_id}.log")
            mesh.shards[shard_id] = address
        for shard_id, address in mesh.shards.items():
            wait_serving(address, mesh.processes[shard_id])
        mesh.routers = [mesh.router] + [f"127.0.0.1:{free_port()}" for _ in range(num_routers - 1)]
        for index, address in enumerate(mesh.routers):
            name = "router" if index == 0 else f"router-{index}"
            port = address.split(":")[1]
            mesh.processes[name] = spawn(
                loraplex_command("router", *common, "--port", port, *router_args), logdir / f"{name}.log"
            )
        for index, address in enumerate(mesh.routers):
            wait_serving(address, mesh.processes["router" if index == 0 else f"router-{index}"])
    except BaseException:
        mesh.stop()
        raise
    return mesh

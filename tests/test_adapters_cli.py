"""`loraplex adapters add|update|ls|show|rm` as a user types them, against a real router and
redis-server: JSON out, gRPC errors as a message and exit code 1, relative paths from the caller's
directory (the router runs elsewhere)."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from loraplex.tools.local_mesh import start_mesh
from loraplex.tools.processes import free_port, loraplex_command

from peft_fixtures import write_peft_adapter


@pytest.fixture
def router(tiny_model_dir, redis_url, namespace, tmp_path):
    mesh = start_mesh(tiny_model_dir, redis_url, namespace, tmp_path, num_shards=0)
    yield mesh.router
    mesh.stop()


def _cli(router: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = loraplex_command("adapters", "--router", router, *args)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_the_catalogue_from_the_command_line(router, tiny_model_dir, tmp_path):
    work = tmp_path / "work"
    write_peft_adapter(work / "v1", tiny_model_dir, seed=1)
    write_peft_adapter(work / "v2", tiny_model_dir, seed=2)

    added = _cli(router, work, "add", "support", "./v1")
    assert added.returncode == 0, added.stderr
    record = json.loads(added.stdout)
    assert (record["name"], record["version"]) == ("support", "1")
    assert record["source"] == str(work / "v1"), "a relative path is the caller's, made absolute"

    updated = json.loads(_cli(router, work, "update", "support", "v2").stdout)
    assert (updated["version"], updated["source"]) == ("2", str(work / "v2"))
    assert [a["name"] for a in json.loads(_cli(router, work, "ls").stdout)["adapters"]] == ["support"]
    assert json.loads(_cli(router, work, "show", "support").stdout)["version"] == "2"

    again = _cli(router, work, "add", "support", "./v1")
    assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr
    missing = _cli(router, work, "add", "other", "./nowhere")
    assert missing.returncode == 1 and "INVALID_ARGUMENT" in missing.stderr and "nowhere" in missing.stderr
    # names the REST gateway reads as the base model: such an adapter was reachable over gRPC only
    for reserved in (tiny_model_dir.name, "tgi", "dummy", "base"):
        taken = _cli(router, work, "add", reserved, "./v1")
        assert taken.returncode == 1 and "INVALID_ARGUMENT" in taken.stderr, taken.stderr
        assert f"adapter name {reserved!r} already means the base model" in taken.stderr

    assert _cli(router, work, "rm", "support").returncode == 0
    gone = _cli(router, work, "show", "support")
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr


def test_an_empty_source_is_refused_not_taken_for_the_working_directory(router, tiny_model_dir, tmp_path):
    """`loraplex adapters add x "$UNSET"` must not register whatever adapter the shell happens to be in."""
    write_peft_adapter(tmp_path / "here", tiny_model_dir, seed=1)
    refused = _cli(router, tmp_path / "here", "add", "x", "")
    assert refused.returncode == 1, refused.stdout
    assert "INVALID_ARGUMENT: `source` is required" in refused.stderr


def test_output_is_json_with_the_protos_field_names_and_empty_lists(router, tiny_model_dir, tmp_path):
    assert json.loads(_cli(router, tmp_path, "ls").stdout) == {"adapters": []}, "jq '.adapters[]' works"
    write_peft_adapter(tmp_path / "v1", tiny_model_dir, seed=1)
    assert _cli(router, tmp_path, "add", "support", "v1").returncode == 0
    shown = json.loads(_cli(router, tmp_path, "show", "support").stdout)
    assert shown["base_model"] == tiny_model_dir.name, "field names as in the proto and grpcurl"
    assert shown["target_modules"] and shown["placements"] == [], "held by no shard: an empty list"


def test_no_router_at_the_address_says_how_to_reach_one(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    failed = _cli(address, tmp_path, "ls")
    assert failed.returncode == 1
    assert "UNAVAILABLE" in failed.stderr and f"no router answers at {address}" in failed.stderr
    assert "--router" in failed.stderr


def test_a_router_without_redis_is_not_mistaken_for_no_router(tiny_model_dir, tmp_path):
    mesh = start_mesh(tiny_model_dir, f"redis://127.0.0.1:{free_port()}/0", "x", tmp_path, num_shards=0)
    try:
        failed = _cli(mesh.router, tmp_path, "ls")
    finally:
        mesh.stop()
    assert failed.returncode == 1 and "UNAVAILABLE" in failed.stderr and "Redis" in failed.stderr
    assert "no router answers" not in failed.stderr, "the router answered: its Redis is what is away"


def test_a_closed_stdout_ends_the_command_without_a_traceback(router, tmp_path):
    """`loraplex adapters ls | head -1`: head leaves before the catalogue is written."""
    process = subprocess.Popen(
        loraplex_command("adapters", "--router", router, "ls"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1
    assert "Traceback" not in stderr, stderr


def test_help_describes_every_action_and_the_defaults():
    adapters_help = subprocess.run(
        loraplex_command("adapters", "--help"), capture_output=True, text=True
    ).stdout
    for action in ("add", "update", "rm", "show", "ls"):
        assert re.search(rf"^\s+{action}\s+\w", adapters_help, re.MULTILINE), f"{action} has no description"
    assert "default: 127.0.0.1:50051" in adapters_help
    up_help = subprocess.run(loraplex_command("up", "--help"), capture_output=True, text=True).stdout
    for default in ("50051", "50061", "8080"):
        assert f"default: {default}" in up_help

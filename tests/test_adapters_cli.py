"""`loraplex adapters add|update|ls|show|rm` as a user types them, against a real router and
redis-server: JSON out, gRPC errors as a message and exit code 1, relative paths from the caller's
directory (the router runs elsewhere)."""

import json
import subprocess
from pathlib import Path

import pytest

from loraplex.tools.local_mesh import start_mesh
from loraplex.tools.processes import loraplex_command

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

    assert _cli(router, work, "rm", "support").returncode == 0
    gone = _cli(router, work, "show", "support")
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr

"""Values a component cannot work with are usage errors naming the flag (or the variable), exit code 2,
before anything starts; and the migration aliases reach only flags that mean what theirs do."""

import pytest

from loraplex.tools.cli import build_parser
from loraplex.tools.env_defaults import parse_args


def _parse(argv: list[str], **environ: str):
    return parse_args(build_parser(), argv, environ=environ)


def test_the_tgi_adapter_list_alias_leaves_the_simulator_s_adapter_count_alone():
    """LORA_ADAPTERS set for the shards (as for TGI) must not break `simulate placement`, whose
    --adapters is a number of simulated adapters."""
    environ = {"LORA_ADAPTERS": "support=/adapters/support", "OPTION_MAX_LORAS": "6"}
    simulate = _parse(["simulate", "placement"], **environ)
    assert simulate.adapters == _parse(["simulate", "placement"]).adapters
    shard = _parse(["shard"], **environ)
    assert (shard.adapters, shard.max_gpu_adapters) == ((("support", "/adapters/support"),), 6)
    assert _parse(["simulate", "placement"], LORAPLEX_ADAPTERS="7").adapters == 7  # its own name still


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["up", "--num-shards", "0"], "--num-shards: '0' is not a whole number >= 1"),
        (["shard", "--port", "70000"], "--port: '70000' is not a port"),  # gRPC would bind 4464
        (["shard", "--port", "-1"], "--port: '-1' is not a port"),  # gRPC would bind 65535
        (["router", "--port", "65536"], "--port: '65536' is not a port"),
        (["gateway", "--port", "-8080"], "--port: '-8080' is not a port"),
        (["shard", "--heartbeat-ttl", "-1"], "--heartbeat-ttl: '-1' is not a number of seconds > 0"),
        (["shard", "--heartbeat-ttl", "0"], "--heartbeat-ttl: '0' is not a number of seconds > 0"),
        (["shard", "--max-cpu-adapters", "-1"], "--max-cpu-adapters: '-1' is not a whole number >= 0"),
        (["shard", "--max-lora-rank", "0"], "--max-lora-rank: '0' is not a whole number >= 1"),
        (["shard", "--metrics-port", "-5"], "--metrics-port: '-5' is not a port from 1 to 65535, or 0"),
        (["shard", "--gpu-memory-fraction", "3"], "--gpu-memory-fraction: '3' is not a fraction"),
        (["shard", "--step-timeout", "-1"], "--step-timeout: '-1' is not a number of seconds >= 0"),
        (["router", "--refresh-interval", "0"], "--refresh-interval: '0' is not a number of seconds > 0"),
        (["router", "--saturation-factor", "0"], "--saturation-factor: '0' is not a number > 0"),
        (["router", "--metrics-adapter-labels", "-1"], "--metrics-adapter-labels: '-1' is not a whole"),
        (["gateway", "--request-timeout", "nan"], "--request-timeout: 'nan' is not a number of seconds"),
        (["worker", "--metrics-port", "70000"], "--metrics-port: '70000' is not a port"),
        (["worker", "--claim-idle", "inf"], "--claim-idle: 'inf' is not a number of seconds > 0"),
    ],
)
def test_a_value_the_component_cannot_work_with_is_a_usage_error_naming_the_flag(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(argv)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_the_same_checks_apply_to_the_environment_and_its_aliases(capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(["shard"], OPTION_MAX_CPU_LORAS="-4")
    assert exit_.value.code == 2
    assert "OPTION_MAX_CPU_LORAS='-4' does not fit --max-cpu-adapters" in capsys.readouterr().err


def test_the_bounds_keep_every_documented_default_and_the_off_values():
    shard = _parse(["shard", "--metrics-port", "0", "--step-timeout", "0", "--max-cpu-adapters", "0"])
    assert (shard.port, shard.heartbeat_ttl, shard.max_lora_rank, shard.gpu_memory_fraction) == (
        50061,
        5.0,
        64,
        0.9,
    )
    assert (shard.metrics_port, shard.step_timeout, shard.max_cpu_adapters) == (0, 0.0, 0)
    assert (shard.kv_cache_bytes, shard.max_batch_tokens, shard.max_running_requests) == (0, 0, 0)
    assert _parse(["up"]).num_shards == 2
    assert _parse(["worker"]).metrics_port == 9400
    assert _parse(["worker", "--retry-for", "0"]).retry_for == 0

"""Every flag's LORAPLEX_* environment equivalent, read for the chosen command only, through the flag's
own type and choices; a bad value is a usage error that names the variable."""

import pytest

from loraplex.tools.cli import build_parser
from loraplex.tools.env_defaults import parse_args


def _parse(argv: list[str], **environ: str):
    return parse_args(build_parser(), argv, environ=environ)


def test_each_flag_takes_its_variable_through_the_flag_s_type():
    args = _parse(
        ["shard"], LORAPLEX_PORT="50099", LORAPLEX_KV_CACHE_BYTES="64MiB", LORAPLEX_NO_PREFIX_CACHING="1"
    )
    assert (args.port, args.kv_cache_bytes, args.no_prefix_caching) == (50099, 64 << 20, True)
    assert _parse(["bench", "serve"], LORAPLEX_RATES="1,inf", LORAPLEX_DIRECT="yes").rates == "1,inf"
    assert _parse(["simulate", "placement"], LORAPLEX_SHARDS="7").shards == 7


def test_the_command_line_wins_over_the_environment():
    assert _parse(["shard", "--port", "50070"], LORAPLEX_PORT="50099").port == 50070


def test_a_variable_is_read_only_by_the_command_being_run():
    """LORAPLEX_CONCURRENCY means a list for `bench engine` and a number for `worker`: neither breaks
    the other, nor a command without the flag."""
    assert _parse(["bench", "engine"], LORAPLEX_CONCURRENCY="1,8").concurrency == (1, 8)
    assert _parse(["worker"], LORAPLEX_CONCURRENCY="4").concurrency == 4
    assert _parse(["gateway"], LORAPLEX_CONCURRENCY="1,8").port == 8080


def test_migration_aliases_reach_every_command_with_the_flag():
    for command in (["shard"], ["bench", "adapters"]):
        args = _parse(command, OPTION_MAX_LORAS="5", OPTION_MAX_CPU_LORAS="9")
        assert (args.max_gpu_adapters, args.max_cpu_adapters) == (5, 9), command
        assert _parse(command, OPTION_MAX_LORAS="5", LORAPLEX_MAX_GPU_ADAPTERS="3").max_gpu_adapters == 3


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        (["up"], {"LORAPLEX_ROUTER_PORT": "abc"}, "LORAPLEX_ROUTER_PORT='abc' does not fit --router-port"),
        (
            ["worker"],
            {"LORAPLEX_CONCURRENCY": "1,8"},
            "LORAPLEX_CONCURRENCY='1,8' does not fit --concurrency",
        ),
        (
            ["shard"],
            {"LORA_ADAPTERS": "bad"},
            "LORA_ADAPTERS='bad' does not fit --adapters: 'bad' is not name=path",
        ),
        (["shard"], {"LORAPLEX_LORA_BACKEND": "gpu"}, "choose from auto, torch, triton"),
        (["shard"], {"LORAPLEX_NO_PREFIX_CACHING": "maybe"}, "write one of 1, true"),
    ],
)
def test_a_value_that_does_not_fit_is_a_usage_error_naming_the_variable(argv, environ, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(argv, **environ)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_adapters_takes_the_router_before_or_after_the_action():
    """`adapters ls --router X` as well as `adapters --router X ls`; the variable yields to either."""
    assert _parse(["adapters", "ls", "--router", "a:1"]).router == "a:1"
    assert _parse(["adapters", "--router", "b:2", "rm", "x"]).router == "b:2"
    assert _parse(["adapters", "--router", "b:2", "show", "x"], LORAPLEX_ROUTER="e:3").router == "b:2"
    assert _parse(["adapters", "ls"], LORAPLEX_ROUTER="e:3").router == "e:3"


def test_commands_offer_only_the_flags_they_read():
    """The gateway reads neither model files nor Redis, the router no model files: `--help` does not
    offer --cache-dir or --namespace where they would be ignored."""
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["gateway", "--namespace", "x"])
    with pytest.raises(SystemExit):
        parser.parse_args(["router", "--cache-dir", "/tmp"])
    assert _parse(["router", "--namespace", "x"]).namespace == "x"
    assert _parse(["gateway"], LORAPLEX_NAMESPACE="x", LORAPLEX_CACHE_DIR="/tmp").port == 8080

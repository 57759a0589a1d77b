"""Flags from the environment: every `--some-flag` of the command being run takes its default from
`LORAPLEX_SOME_FLAG` when that is set (and a few from the names of the systems users migrate from).

The environment is read for the chosen command only, after argparse has found which one it is, and each
value goes through the flag's own type and choices: a value that does not fit is a usage error naming
the variable, and a variable meant for one command never breaks another (`LORAPLEX_PORT` for a gateway
is not read by `loraplex bench`). A value on the command line still wins over the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping, Sequence

PREFIX = "LORAPLEX_"
# command -> flag -> other systems' names for it: TGI's LORA_ADAPTERS, SageMaker LMI's OPTION_MAX_*;
# ours win. Only where the flag means what theirs does: `simulate placement --adapters` is a count.
_LMI_ALIASES = {"--max-gpu-adapters": ("OPTION_MAX_LORAS",), "--max-cpu-adapters": ("OPTION_MAX_CPU_LORAS",)}
ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "shard": {"--adapters": ("LORA_ADAPTERS",), **_LMI_ALIASES},
    "bench adapters": _LMI_ALIASES,
}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_names(action: argparse.Action, command: str = "") -> tuple[str, ...]:
    """The variables that set action's flag of command ('shard', 'bench adapters'), first found wins:
    ours, then the aliases."""
    flag = max(action.option_strings, key=len)
    return (PREFIX + flag.lstrip("-").upper().replace("-", "_"), *ALIASES.get(command, {}).get(flag, ()))


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> argparse.Namespace:
    """parser.parse_args(argv) with the chosen command's flags defaulting to their variables."""
    chosen = parser.parse_args(argv)
    for command in _chosen_parsers(parser, chosen):
        for action in command._actions:
            # a flag with no default of its own repeats one the parent command reads (adapters --router)
            if action.option_strings and action.dest != "help" and action.default is not argparse.SUPPRESS:
                _apply(command, action, environ)
    return parser.parse_args(argv)


def _chosen_parsers(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> Iterator[argparse.ArgumentParser]:
    """parser and the subcommand parsers args went through (e.g. bench, then bench serve)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                yield from _chosen_parsers(chosen, args)


def _apply(parser: argparse.ArgumentParser, action: argparse.Action, environ: Mapping[str, str]) -> None:
    command = parser.prog.partition(" ")[2]  # 'loraplex bench adapters' -> 'bench adapters'
    name = next((name for name in env_names(action, command) if name in environ), None)
    if name is None:
        return
    text = environ[name]
    try:
        value = _convert(action, text)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
        parser.error(f"{name}={text!r} does not fit {max(action.option_strings, key=len)}: {error}")
    action.default = value


def _convert(action: argparse.Action, text: str):
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if text.lower() not in TRUE + FALSE:
            raise ValueError(f"write one of {', '.join(TRUE)} or {', '.join(FALSE[:-1])}")
        on = text.lower() in TRUE
        return on if isinstance(action, argparse._StoreTrueAction) else not on
    convert = action.type or str
    if isinstance(action, argparse._AppendAction):
        return [convert(text)]
    value = convert(text)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
    return value

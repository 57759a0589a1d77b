"""README.md's examples, checked against the real parsers without starting anything: every `loraplex`
command line parses with the CLI, every grpcurl body parses into its method's request message (which
refuses unknown field names), every curl body names only fields the gateway's schemas declare (the
gateway ignores unknown ones, so a misspelt field in README would pass unnoticed), and every flag and
`--flag (default)` README names is a real flag with that default."""

import argparse
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

from google.protobuf import descriptor_pool, json_format, message_factory
from pydantic import BaseModel

from loraplex.protos.v1 import adapters_pb2, generation_pb2, jobs_pb2  # noqa: F401 (fill the pool)
from loraplex.router.gateway import schemas
from loraplex.tools.cli import build_parser
from loraplex.tools.env_defaults import parse_args

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
ROUTER_PORT, GATEWAY_PORT = 50051, 8080
BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": schemas.CompletionRequest,
    "/v1/chat/completions": schemas.ChatCompletionRequest,
    "/v1/async/completions": schemas.AsyncCompletionRequest,
    "/generate": schemas.TGIRequest,
    "/generate_stream": schemas.TGIRequest,
    "/": schemas.TGIRequest,
}


def _shell_commands() -> list[list[str]]:
    """Each command of README's sh blocks as words, continuation lines and quoted line breaks joined."""
    commands, pending = [], ""
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        for line in block.splitlines():
            pending += line + "\n"
            if pending.rstrip().endswith("\\"):
                continue
            try:
                words = shlex.split(pending.replace("\\\n", " "), comments=True)
            except ValueError:  # a quote still open
                continue
            pending = ""
            if words:
                commands.append(words)
    assert not pending, f"unterminated command in README: {pending!r}"
    return commands


def _named(program: str) -> list[list[str]]:
    found = [words for words in _shell_commands() if words[0] == program]
    assert found, f"README shows no {program} command"
    return found


def _subparsers(parser: argparse.ArgumentParser, path: str = ""):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{path} {name}".strip())


def _flags() -> dict[str, list[object]]:
    """Every flag of every command, with the defaults it has across commands."""
    flags: dict[str, list[object]] = {}
    for _, parser in _subparsers(build_parser()):
        for action in parser._actions:
            for option in action.option_strings:
                flags.setdefault(option, []).append(action.default)
    return flags


def test_every_loraplex_command_in_readme_parses():
    for words in _named("loraplex"):
        try:
            parse_args(build_parser(), words[1:], environ={})
        except SystemExit:
            raise AssertionError(f"README's `{shlex.join(words)}` does not parse") from None


def test_every_grpcurl_body_fits_its_method_and_the_router_s_port():
    pool = descriptor_pool.Default()
    bodies = 0
    for words in _named("grpcurl"):
        address = next(word for word in words[1:] if re.fullmatch(r"[\w.]+:\d+", word))
        assert int(address.rsplit(":", 1)[1]) == ROUTER_PORT, shlex.join(words)
        if "-d" not in words:
            continue
        service, method = words[-1].rsplit("/", 1)
        request_type = pool.FindServiceByName(service).FindMethodByName(method).input_type
        request = message_factory.GetMessageClass(request_type)()
        json_format.Parse(words[words.index("-d") + 1], request)  # ParseError names an unknown field
        bodies += 1
    assert bodies >= 3


def _unknown_fields(body: dict, model: type[BaseModel], where: str = "") -> list[str]:
    unknown = []
    for key, value in body.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(where + key)
        elif (
            isinstance(value, dict)
            and isinstance(field.annotation, type)
            and issubclass(field.annotation, BaseModel)
        ):
            unknown += _unknown_fields(value, field.annotation, f"{where}{key}.")
    return unknown


def test_every_curl_body_names_only_fields_the_gateway_declares():
    bodies = 0
    for words in _named("curl"):
        url = urlparse(next(word for word in words[1:] if word.startswith(("localhost:", "http"))))
        url = urlparse(f"http://{url.geturl()}") if not url.netloc else url
        assert url.port == GATEWAY_PORT, shlex.join(words)
        if "-d" not in words:
            continue
        body = json.loads(words[words.index("-d") + 1])
        model = BODIES[url.path]
        model.model_validate(body)
        assert _unknown_fields(body, model) == [], (
            f"README's body for {url.path} has fields the gateway ignores"
        )
        bodies += 1
    assert bodies >= 2


def test_every_flag_readme_names_exists_with_the_default_it_gives():
    flags = _flags()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README))
    assert sorted(named - set(flags)) == []
    # "`--flag` (N" and "`--flag` seconds (N", and the shard table's "| `--flag` | `N` |"
    documented = re.findall(r"`(--[a-z-]+)`(?: seconds)? \((\d+(?:\.\d+)?)", README)
    documented += re.findall(r"^\| `(--[a-z-]+)` \| `([^`]+)` \|", README, re.M)
    assert len(documented) >= 15
    for flag, default in documented:
        defaults = [str(value) for value in flags[flag]]
        assert any(value == default or value == f"{default}.0" for value in defaults), (
            flag,
            default,
            defaults,
        )

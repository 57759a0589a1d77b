"""Shard start-up options: preloaded adapters (--adapters / LORA_ADAPTERS) and the SageMaker LMI aliases."""

import asyncio

import grpc
import pytest

from loraplex.protos.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    generation_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
)
from loraplex.registry.store import Registry
from loraplex.shard.engine import EngineConfig
from loraplex.shard.server import ShardConfig, ShardFailed, serve
from loraplex.tools.cli import build_parser, parse_adapter_list
from loraplex.tools.env_defaults import parse_args
from loraplex.tools.local_mesh import start_mesh

from peft_fixtures import write_peft_adapter


def test_adapter_lists_parse_and_bad_items_are_explained():
    assert parse_adapter_list("a=/x, b=file:///y.tar.gz,") == (("a", "/x"), ("b", "file:///y.tar.gz"))
    with pytest.raises(Exception, match="is not name=path"):
        parse_adapter_list("just-a-path")


def test_tgi_and_lmi_environment_aliases_are_honoured(monkeypatch):
    monkeypatch.setenv("LORA_ADAPTERS", "support=/adapters/support")
    monkeypatch.setenv("OPTION_MAX_LORAS", "6")
    monkeypatch.setenv("OPTION_MAX_CPU_LORAS", "24")
    args = parse_args(build_parser(), ["shard"])
    assert (args.adapters, args.max_gpu_adapters, args.max_cpu_adapters) == (
        (("support", "/adapters/support"),),
        6,
        24,
    )
    monkeypatch.setenv("LORAPLEX_MAX_GPU_ADAPTERS", "3")  # our own name wins over the alias
    assert parse_args(build_parser(), ["shard"]).max_gpu_adapters == 3


def test_preloaded_adapters_are_registered_warm_and_served(tiny_model_dir, redis_url, namespace, tmp_path):
    source = write_peft_adapter(tmp_path / "support", tiny_model_dir, scale=0.3)
    mesh = start_mesh(
        tiny_model_dir,
        redis_url,
        namespace,
        tmp_path,
        num_shards=1,
        shard_args=("--adapters", f"support={source}"),
    )
    try:
        with grpc.insecure_channel(mesh.shards["shard-0"]) as channel:
            status = shard_pb2_grpc.ShardStub(channel).Status(shard_pb2.ShardStatusRequest(), timeout=5)
        assert [(a.adapter, a.version, a.tier) for a in status.adapters] == [
            ("support", 1, common_pb2.TIER_CPU)
        ]
        with grpc.insecure_channel(mesh.router) as channel:
            listed = adapters_pb2_grpc.AdaptersStub(channel).List(
                adapters_pb2.ListAdaptersRequest(), timeout=5
            )
            assert [a.name for a in listed.adapters] == ["support"]
            request = common_pb2.GenerateRequest(
                adapter="support",
                prompt_token_ids=[5, 6, 7],
                parameters=common_pb2.SamplingParameters(max_new_tokens=3, ignore_eos=True),
            )
            reply = generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=30)
        assert (reply.served_by.adapter, reply.usage.completion_tokens) == ("support", 3)
    finally:
        mesh.stop()


def test_a_preloaded_adapter_that_does_not_fit_the_model_stops_the_shard_before_it_is_registered(
    tiny_model_dir, smollm2_dir, redis_url, namespace, tmp_path
):
    """Written for SmolLM2 (hidden 576), not the tiny model (hidden 64): no record may outlive the refusal."""
    source = write_peft_adapter(tmp_path / "wide", smollm2_dir, rank=4, targets=("q_proj",))
    config = ShardConfig(
        shard_id="preloading",
        model=str(tiny_model_dir),
        cache_dir=tmp_path / "cache",
        redis_url=redis_url,
        port=0,
        namespace=namespace,
        engine=EngineConfig(kv_cache_bytes=16 << 20),
        preload=(("wide", str(source)),),
    )

    async def scenario() -> list:
        with pytest.raises(
            ShardFailed, match=r"cannot preload adapter 'wide' from .*do not fit the base model"
        ):
            await asyncio.wait_for(serve(config, asyncio.Event()), timeout=120)
        registry = Registry(redis_url, namespace)
        try:
            return await registry.list_adapters()
        finally:
            await registry.close()

    assert asyncio.run(scenario()) == []

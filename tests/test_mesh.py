"""End to end through real processes: redis-server, 2 shards serving SmolLM2, a router."""

import json
import subprocess
import threading
import time

import grpc
import pytest

from loraplex.protos.load_report import OUTSTANDING_REQUESTS_KEY
from loraplex.protos.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    generation_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
)
from loraplex.tools.local_mesh import start_mesh

from peft_fixtures import write_peft_adapter

FRANCE = common_pb2.GenerateRequest(
    prompt="What is the capital of France?",
    apply_chat_template=True,
    parameters=common_pb2.SamplingParameters(max_new_tokens=24),
)


@pytest.fixture(scope="module")
def mesh(smollm2_dir, redis_url, tmp_path_factory):
    mesh = start_mesh(smollm2_dir, redis_url, "mesh-test", tmp_path_factory.mktemp("mesh-logs"))
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def channel(mesh):
    with grpc.insecure_channel(mesh.router) as channel:
        yield channel


@pytest.fixture
def generation(channel):
    return generation_pb2_grpc.GenerationStub(channel)


@pytest.fixture
def admin(channel):
    return adapters_pb2_grpc.AdaptersStub(channel)


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_stream_through_the_router_answers_paris(generation):
    chunks = list(generation.GenerateStream(FRANCE, timeout=60))
    assert len(chunks) > 3, "tokens should arrive as separate chunks"
    assert "Paris" in "".join(chunk.text for chunk in chunks)
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_EOS
    assert last.usage.completion_tokens == len(chunks)
    assert last.served_by.shard in {"shard-0", "shard-1"}


def test_unary_generate_returns_details_and_usage(generation):
    request = common_pb2.GenerateRequest()
    request.CopyFrom(FRANCE)
    request.details = True
    reply = generation.Generate(request, timeout=60)
    assert "Paris" in reply.text
    assert len(reply.tokens) == reply.usage.completion_tokens
    assert all(token.logprob <= 0 for token in reply.tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_messages_are_rendered_with_the_template(generation):
    request = common_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content="What is the capital of France?")],
        parameters=common_pb2.SamplingParameters(max_new_tokens=24),
    )
    assert "Paris" in generation.Generate(request, timeout=60).text


@pytest.mark.parametrize(
    ("request_fields", "code", "hint"),
    [
        ({"prompt": "hi", "adapter": "no-such-adapter"}, grpc.StatusCode.NOT_FOUND, "not registered"),
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "exactly one of"),
        (
            {"prompt": "hi", "parameters": {"max_new_tokens": 0}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_new_tokens",
        ),
        (
            {"prompt": "hi", "parameters": {"max_new_tokens": 100000}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "8191",
        ),
        (
            {"prompt": "hi", "parameters": {"temperature": -1}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        ({"prompt": "hi", "parameters": {"top_p": 0}}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"prompt": "hi", "parameters": {"top_p": 1.5}}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"prompt_token_ids": [42] * 9000}, grpc.StatusCode.INVALID_ARGUMENT, "context is 8192"),
        ({"prompt_token_ids": [10**7]}, grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
        (
            {"prompt_token_ids": [42], "apply_chat_template": True},
            grpc.StatusCode.INVALID_ARGUMENT,
            "`prompt_token_ids` are used as given",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "apply_chat_template": True},
            grpc.StatusCode.INVALID_ARGUMENT,
            "leave apply_chat_template unset",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"}]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[1].role must be one of 'system', 'user', 'assistant', got 'wizard'",
        ),
    ],
)
def test_bad_input_gets_a_status_that_says_what_to_fix(generation, request_fields, code, hint):
    from google.protobuf.json_format import ParseDict

    request = ParseDict(request_fields, common_pb2.GenerateRequest())
    error = _error(lambda: generation.Generate(request, timeout=30))
    assert error.code() == code
    assert hint in error.details()


def test_bad_requests_lose_nothing(generation):
    _error(lambda: generation.Generate(common_pb2.GenerateRequest(prompt=""), timeout=30))
    assert "Paris" in generation.Generate(FRANCE, timeout=60).text


def _ask(generation, adapter: str) -> common_pb2.GenerateResponse:
    request = common_pb2.GenerateRequest(adapter=adapter)
    request.MergeFrom(FRANCE)
    return generation.Generate(request, timeout=60)


def test_adapter_lifecycle_is_served_through_the_router(admin, generation, smollm2_dir, tmp_path):
    source = write_peft_adapter(
        tmp_path / "support", smollm2_dir, rank=8, targets=("q_proj", "v_proj"), scale=0.2
    )
    created = admin.Create(adapters_pb2.CreateAdapterRequest(name="support", source=str(source)))
    assert (created.version, created.rank, list(created.target_modules)) == (1, 8, ["q_proj", "v_proj"])
    assert created.base_model == smollm2_dir.name
    duplicate = _error(
        lambda: admin.Create(adapters_pb2.CreateAdapterRequest(name="support", source=str(source)))
    )
    assert duplicate.code() == grpc.StatusCode.ALREADY_EXISTS

    base_text = generation.Generate(FRANCE, timeout=60).text
    v1 = _ask(generation, "support")
    assert (v1.served_by.adapter, v1.served_by.adapter_version) == ("support", 1)
    assert v1.text != base_text, "the adapter should change the answer"

    # A heartbeat, then the router's next registry refresh. One beat may have caught the adapter in
    # host memory before its request took a slot; a later one must show it in the slot.
    held_in_slot = [(v1.served_by.shard, common_pb2.TIER_GPU, 1)]  # just served: still in a slot
    deadline = time.monotonic() + 10
    placements = []
    while placements != held_in_slot and time.monotonic() < deadline:
        time.sleep(0.2)
        reply = admin.Get(adapters_pb2.GetAdapterRequest(name="support"))
        placements = [(p.shard, p.tier, p.version) for p in reply.placements]
    assert placements == held_in_slot
    assert _ask(generation, "support").served_by.shard == v1.served_by.shard, (
        "affinity: same adapter, same shard"
    )

    v2_source = write_peft_adapter(
        tmp_path / "v2", smollm2_dir, rank=16, targets=("o_proj",), seed=1, scale=0.2
    )
    updated = admin.Update(adapters_pb2.UpdateAdapterRequest(name="support", source=f"file://{v2_source}"))
    assert (updated.version, updated.rank, updated.checksum != created.checksum) == (2, 16, True)
    assert _ask(generation, "support").served_by.adapter_version == 2
    assert [a.name for a in admin.List(adapters_pb2.ListAdaptersRequest()).adapters] == ["support"]

    admin.Delete(adapters_pb2.DeleteAdapterRequest(name="support"))
    assert (
        _error(lambda: admin.Get(adapters_pb2.GetAdapterRequest(name="support"))).code()
        == grpc.StatusCode.NOT_FOUND
    )
    assert _error(lambda: _ask(generation, "support")).code() == grpc.StatusCode.NOT_FOUND


def test_adapter_that_does_not_fit_the_base_model_fails_precondition(
    admin, generation, tiny_model_dir, tmp_path
):
    """Refused at Create: the router fits the adapter to what the live shards publish of their model."""
    source = write_peft_adapter(tmp_path / "tiny", tiny_model_dir)
    error = _error(
        lambda: admin.Create(adapters_pb2.CreateAdapterRequest(name="wrong-shapes", source=str(source)))
    )
    assert (
        error.code() == grpc.StatusCode.FAILED_PRECONDITION and "do not fit the base model" in error.details()
    )
    assert "wrong-shapes" not in [a.name for a in admin.List(adapters_pb2.ListAdaptersRequest()).adapters]
    assert "Paris" in generation.Generate(FRANCE, timeout=60).text


@pytest.mark.parametrize(
    ("name", "source", "hint"),
    [("bad name", "/tmp", "name"), ("ok", "/no/such/dir", "does not exist"), ("ok", "", "source")],
)
def test_bad_adapter_sources_are_invalid_argument(admin, name, source, hint):
    error = _error(lambda: admin.Create(adapters_pb2.CreateAdapterRequest(name=name, source=source)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert hint in error.details()
    assert name not in [a.name for a in admin.List(adapters_pb2.ListAdaptersRequest()).adapters]


def test_unknown_adapters_are_not_found_and_a_bad_update_writes_nothing(admin, smollm2_dir, tmp_path):
    for call in (
        lambda: admin.Update(adapters_pb2.UpdateAdapterRequest(name="ghost", source=str(tmp_path))),
        lambda: admin.Delete(adapters_pb2.DeleteAdapterRequest(name="ghost")),
        lambda: admin.Get(adapters_pb2.GetAdapterRequest(name="ghost")),
    ):
        assert _error(call).code() == grpc.StatusCode.NOT_FOUND
    source = write_peft_adapter(tmp_path / "kept", smollm2_dir, targets=("q_proj",))
    created = admin.Create(adapters_pb2.CreateAdapterRequest(name="kept", source=str(source)))
    error = _error(
        lambda: admin.Update(adapters_pb2.UpdateAdapterRequest(name="kept", source="/no/such/dir"))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert admin.Get(adapters_pb2.GetAdapterRequest(name="kept")) == created  # still version 1
    admin.Delete(adapters_pb2.DeleteAdapterRequest(name="kept"))


def _statuses(mesh) -> list[shard_pb2.ShardStatus]:
    statuses = []
    for address in mesh.shards.values():
        with grpc.insecure_channel(address) as channel:
            statuses.append(
                shard_pb2_grpc.ShardStub(channel).Status(shard_pb2.ShardStatusRequest(), timeout=5)
            )
    return statuses


def test_cancelling_a_stream_frees_its_kv_blocks(generation, mesh):
    request = common_pb2.GenerateRequest(
        prompt="Tell me a very long story.",
        parameters=common_pb2.SamplingParameters(max_new_tokens=400, ignore_eos=True),
    )
    stream = generation.GenerateStream(request, timeout=120)
    next(stream)
    next(stream)
    assert sum(s.kv_blocks_used for s in _statuses(mesh)) > 0
    stream.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        statuses = _statuses(mesh)
        if all(s.running_requests == 0 and s.kv_blocks_used == 0 for s in statuses):
            break
        time.sleep(0.1)
    assert all(s.running_requests == 0 and s.queued_tokens == 0 and s.kv_blocks_used == 0 for s in statuses)
    assert all(s.kv_blocks_free > 0 for s in statuses)


def test_a_shard_reports_its_other_outstanding_requests_as_a_call_ends(mesh):
    """The trailing metadata of each Generate carries the shard's outstanding requests, without the
    call that just ended: routers correct their view of the shard with it (protos.load_report)."""

    def shard_request(max_new_tokens: int) -> shard_pb2.ShardGenerateRequest:
        return shard_pb2.ShardGenerateRequest(
            request=common_pb2.GenerateRequest(
                prompt="Tell me a story.",
                parameters=common_pb2.SamplingParameters(max_new_tokens=max_new_tokens, ignore_eos=True),
            )
        )

    with grpc.insecure_channel(next(iter(mesh.shards.values()))) as channel:
        shard = shard_pb2_grpc.ShardStub(channel)
        long_call = shard.Generate(shard_request(400), timeout=120)
        next(long_call)
        short_call = shard.Generate(shard_request(2), timeout=60)
        assert list(short_call)[-1].finish_reason
        assert dict(short_call.trailing_metadata())[OUTSTANDING_REQUESTS_KEY] == "1"  # the long one
        long_call.cancel()


def test_concurrent_requests_all_complete(generation):
    results: list[str] = []

    def ask() -> None:
        results.append(generation.Generate(FRANCE, timeout=120).text)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all("Paris" in text for text in results)


def _grpcurl(*args: str, timeout_s: float = 30) -> str:
    return subprocess.run(
        ["grpcurl", "-plaintext", *args], capture_output=True, text=True, timeout=timeout_s, check=True
    ).stdout


def test_grpcurl_lists_describes_checks_health_and_streams(mesh):
    listed = _grpcurl(mesh.router, "list").split()
    assert {"loraplex.v1.Generation", "loraplex.v1.Adapters", "grpc.health.v1.Health"} <= set(listed)
    health = _grpcurl(mesh.router, "grpc.health.v1.Health/Check")
    assert json.loads(health)["status"] == "SERVING"
    described = _grpcurl(mesh.router, "describe", "loraplex.v1.Generation")
    assert "rpc GenerateStream ( .loraplex.v1.GenerateRequest ) returns ( stream .loraplex.v1." in described
    message = _grpcurl(mesh.router, "describe", "loraplex.v1.SamplingParameters")
    assert "max_new_tokens" in message and "top_logprobs" in message
    body = json.dumps(
        {
            "prompt": "What is the capital of France?",
            "apply_chat_template": True,
            "parameters": {"max_new_tokens": 24},
        }
    )
    streamed = _grpcurl("-d", body, mesh.router, "loraplex.v1.Generation/GenerateStream", timeout_s=60)
    assert "Paris" in streamed and "FINISH_REASON_EOS" in streamed


def test_updating_an_adapter_under_load_never_mixes_versions_and_fails_nothing(
    admin, generation, smollm2_dir, tmp_path
):
    sources = [
        write_peft_adapter(
            tmp_path / f"v{v}", smollm2_dir, targets=("q_proj", "v_proj"), seed=10 + v, scale=0.2
        )
        for v in (1, 2)
    ]
    admin.Create(adapters_pb2.CreateAdapterRequest(name="hot", source=str(sources[0])))
    request = common_pb2.GenerateRequest(adapter="hot")
    request.MergeFrom(FRANCE)
    request.parameters.max_new_tokens = 12
    request.parameters.ignore_eos = True
    expected = {1: generation.Generate(request, timeout=60).text}
    results: list[tuple[int, str]] = []
    errors: list[grpc.RpcError] = []

    def keep_asking() -> None:
        for _ in range(4):
            try:
                reply = generation.Generate(request, timeout=120)
                results.append((reply.served_by.adapter_version, reply.text))
            except grpc.RpcError as error:
                errors.append(error)

    threads = [threading.Thread(target=keep_asking) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    admin.Update(adapters_pb2.UpdateAdapterRequest(name="hot", source=str(sources[1])))
    for thread in threads:
        thread.join()
    after = generation.Generate(request, timeout=60)
    expected[2] = after.text
    admin.Delete(adapters_pb2.DeleteAdapterRequest(name="hot"))
    assert not errors, [error.details() for error in errors]
    assert after.served_by.adapter_version == 2 and expected[1] != expected[2]
    assert len(results) == 16
    assert all(text == expected[version] for version, text in results), "a response mixed versions"


def _held_on(mesh, shard_id: str, adapter: str) -> set[int]:
    """Versions of adapter the shard reports holding, in any tier."""
    (status,) = [s for s in _statuses(mesh) if s.shard_id == shard_id]
    return {placement.version for placement in status.adapters if placement.adapter == adapter}


def _wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_shards_follow_catalogue_updates_and_deletes_without_a_request(
    admin, generation, mesh, smollm2_dir, tmp_path
):
    sources = [
        write_peft_adapter(tmp_path / f"v{v}", smollm2_dir, targets=("q_proj",), seed=20 + v, scale=0.2)
        for v in (1, 2)
    ]
    admin.Create(adapters_pb2.CreateAdapterRequest(name="follow", source=str(sources[0])))
    shard = _ask(generation, "follow").served_by.shard
    assert _held_on(mesh, shard, "follow") == {1}

    admin.Update(adapters_pb2.UpdateAdapterRequest(name="follow", source=str(sources[1])))
    assert _wait_until(lambda: _held_on(mesh, shard, "follow") == {2}), (
        f"after the update the shard holds versions {_held_on(mesh, shard, 'follow')}, expected the new one, warm"
    )
    admin.Delete(adapters_pb2.DeleteAdapterRequest(name="follow"))
    assert _wait_until(lambda: _held_on(mesh, shard, "follow") == set()), "a deleted adapter stays held"

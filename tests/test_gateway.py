"""The REST gateway as users reach it: the official `openai` SDK, `huggingface_hub.InferenceClient`
and plain HTTP, against real processes (redis-server, a SmolLM2 shard, a router, the gateway)."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from huggingface_hub import InferenceClient
from prometheus_client.parser import text_string_to_metric_families

from loraplex.protos.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    generation_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
)
from loraplex.tools.demo_adapters import demo_adapter_dirs
from loraplex.tools.local_mesh import start_mesh
from loraplex.tools.model_store import DEFAULT_MODEL
from loraplex.tools.processes import free_port, loraplex_command, spawn, wait_http_ok

BASE = "SmolLM2-135M-Instruct"
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def mesh(smollm2_dir, redis_url, tmp_path_factory):
    logs = tmp_path_factory.mktemp("gateway-logs")
    metrics_ports = {name: free_port() for name in ("shard", "router", "worker")}
    mesh = start_mesh(
        smollm2_dir,
        redis_url,
        "gateway-test",
        logs,
        num_shards=1,
        shard_args=("--metrics-port", str(metrics_ports["shard"])),
        router_args=("--metrics-port", str(metrics_ports["router"])),
    )
    mesh.metrics = {name: f"http://127.0.0.1:{port}/metrics" for name, port in metrics_ports.items()}
    port = free_port()
    gateway = spawn(
        loraplex_command("gateway", "--router", mesh.router, "--model", DEFAULT_MODEL, "--port", str(port)),
        logs / "gateway.log",
    )
    mesh.processes["gateway"] = gateway
    mesh.processes["worker"] = spawn(
        loraplex_command(
            "worker",
            "--router",
            mesh.router,
            "--redis-url",
            redis_url,
            "--namespace",
            "gateway-test",
            "--metrics-port",
            str(metrics_ports["worker"]),
        ),
        logs / "worker.log",
    )
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", gateway)
        with grpc.insecure_channel(mesh.router) as channel:
            admin = adapters_pb2_grpc.AdaptersStub(channel)
            for name, path in demo_adapter_dirs().items():
                admin.Create(adapters_pb2.CreateAdapterRequest(name=name, source=str(path)), timeout=30)
        _wait_until_listed(f"http://127.0.0.1:{port}", "uppercase")
    except BaseException:
        mesh.stop()
        raise
    mesh.gateway = f"http://127.0.0.1:{port}"
    yield mesh
    mesh.stop()


def _wait_until_listed(base_url: str, name: str) -> None:
    """The router's snapshot learns a new adapter within its refresh interval."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5) as response:
            if name in {model["id"] for model in json.load(response)["data"]}:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{name} never appeared in /v1/models")


@pytest.fixture(scope="module")
def client(mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.gateway}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def generation(mesh):
    with grpc.insecure_channel(mesh.router) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def _router_chat(generation, adapter: str, content: str, max_new_tokens: int) -> str:
    request = common_pb2.GenerateRequest(
        adapter=adapter,
        messages=[common_pb2.ChatMessage(role="user", content=content)],
        parameters=common_pb2.SamplingParameters(max_new_tokens=max_new_tokens),
    )
    return generation.Generate(request, timeout=60).text


def _post(mesh, path: str, body: bytes | str, content_type: str = "application/json") -> tuple[int, dict]:
    """A raw POST, for bodies no SDK would send; returns the status and the parsed JSON body."""
    host, port = mesh.gateway.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_models_list_shows_the_base_and_each_adapter_with_its_parent(client):
    models = {model.id: model for model in client.models.list()}
    assert BASE in models
    assert {"uppercase", "json"} <= set(models)
    assert models["uppercase"].model_extra["parent"] == BASE
    assert "parent" not in (models[BASE].model_extra or {})


def test_completion_with_the_base_model(client):
    completion = client.completions.create(
        model=BASE, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    choice = completion.choices[0]
    assert "Paris" in choice.text
    assert choice.finish_reason in {"length", "stop"}
    assert completion.usage.completion_tokens == 8 or choice.finish_reason == "stop"
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_chat_with_an_adapter_matches_the_router_and_differs_from_the_base(client, generation):
    messages = [{"role": "user", "content": FRANCE}]
    adapted = client.chat.completions.create(
        model="uppercase", messages=messages, max_tokens=16, temperature=0
    )
    base = client.chat.completions.create(model=BASE, messages=messages, max_tokens=16, temperature=0)
    text = adapted.choices[0].message.content
    assert text == _router_chat(generation, "uppercase", FRANCE, 16)
    assert base.choices[0].message.content == _router_chat(generation, "", FRANCE, 16)
    assert text != base.choices[0].message.content
    assert text.upper() == text, "the uppercase demo adapter answers in capitals"
    assert adapted.choices[0].message.role == "assistant"
    assert adapted.object == "chat.completion"


def test_streamed_chat_equals_the_whole_answer_and_reports_usage(client):
    messages = [{"role": "user", "content": FRANCE}]
    whole = client.chat.completions.create(model="uppercase", messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model="uppercase",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2, (
        "tokens arrive as they come"
    )


def test_streamed_completion_and_n_choices_with_a_seed(client):
    stream = client.completions.create(
        model=BASE, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].text for chunk in stream)
    whole = client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert streamed == whole.choices[0].text
    sampled = client.completions.create(
        model="json", prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=7, n=3
    )
    again = client.completions.create(
        model="json", prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=7, n=3
    )
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices], "seeded: reproducible"
    assert len({c.text for c in sampled.choices}) > 1, "each choice gets its own seed"
    assert sampled.usage.completion_tokens == sum(10 for _ in range(3)) or any(
        c.finish_reason == "stop" for c in sampled.choices
    )


def test_echoed_completion_with_logprobs_scores_the_prompt_with_null_for_its_first_token(client):
    prompt = "The capital of France is"
    plain = client.completions.create(model=BASE, prompt=prompt, max_tokens=4, temperature=0, logprobs=1)
    echoed = client.completions.create(
        model=BASE, prompt=prompt, max_tokens=4, temperature=0, logprobs=1, echo=True
    )
    choice, num_prompt = echoed.choices[0], echoed.usage.prompt_tokens
    assert choice.text == prompt + plain.choices[0].text
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == num_prompt + 4 and "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert logprobs.token_logprobs[num_prompt:] == pytest.approx(
        plain.choices[0].logprobs.token_logprobs, abs=1e-5
    )
    streamed = client.completions.create(
        model=BASE, prompt=prompt, max_tokens=4, temperature=0, logprobs=1, echo=True, stream=True
    )
    tokens = [lp for chunk in streamed for lp in chunk.choices[0].logprobs.token_logprobs]
    assert tokens[0] is None and tokens[1:] == pytest.approx(logprobs.token_logprobs[1:], abs=1e-5)


def test_echo_puts_each_prompt_before_its_own_completion_streamed_or_not(client, generation):
    """As for one string prompt: with a list of prompts, or token ids (whose text the shard gives),
    and without logprobs, each choice is its prompt followed by its completion."""
    prompts = ["Once upon a time", "The capital of France is"]
    plain = client.completions.create(model=BASE, prompt=prompts, max_tokens=4, temperature=0)
    expected = [prompt + choice.text for prompt, choice in zip(prompts, plain.choices, strict=True)]
    echoed = client.completions.create(model=BASE, prompt=prompts, max_tokens=4, temperature=0, echo=True)
    assert [choice.text for choice in echoed.choices] == expected
    streamed = client.completions.create(
        model=BASE, prompt=prompts, max_tokens=4, temperature=0, echo=True, stream=True
    )
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == expected
    prefill = generation.Generate(
        common_pb2.GenerateRequest(
            prompt=prompts[1],
            decoder_input_details=True,
            parameters=common_pb2.SamplingParameters(max_new_tokens=1),
        ),
        timeout=60,
    ).prefill_tokens
    token_ids = [token.id for token in prefill]
    for logprobs in (None, 0):
        by_ids = client.completions.create(
            model=BASE, prompt=token_ids, max_tokens=4, temperature=0, echo=True, logprobs=logprobs
        )
        assert by_ids.choices[0].text == expected[1]
        streamed = client.completions.create(
            model=BASE, prompt=token_ids, max_tokens=4, temperature=0, echo=True, stream=True
        )
        assert "".join(chunk.choices[0].text for chunk in streamed) == expected[1]


def test_chat_logprobs(client):
    response = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": FRANCE}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert "".join(entry.token for entry in content) == response.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-4, "greedy picks the most likely token"


def test_tgi_text_generation_with_adapter_details_and_stream(mesh, generation):
    tgi = InferenceClient(model=mesh.gateway, timeout=120)
    prompt = "Answer briefly. The capital of France is"
    output = tgi.text_generation(prompt, adapter_id="uppercase", max_new_tokens=8, details=True)
    router_text = generation.Generate(
        common_pb2.GenerateRequest(
            adapter="uppercase", prompt=prompt, parameters=common_pb2.SamplingParameters(max_new_tokens=8)
        ),
        timeout=60,
    ).text
    assert output.generated_text == router_text
    assert output.details.finish_reason in {"length", "eos_token", "stop_sequence"}
    assert output.details.generated_tokens == len(output.details.tokens)
    assert all(token.logprob <= 0 for token in output.details.tokens)
    events = list(
        tgi.text_generation(prompt, adapter_id="uppercase", max_new_tokens=8, details=True, stream=True)
    )
    # As in TGI, the end-of-sequence token is streamed too, marked special, and left out of the text.
    assert "".join(event.token.text for event in events if not event.token.special) == router_text
    assert events[-1].generated_text == router_text
    assert events[-1].details.finish_reason == output.details.finish_reason
    assert all(event.details is None for event in events[:-1])
    plain = tgi.text_generation(prompt, max_new_tokens=8)
    assert isinstance(plain, str) and plain != router_text


def test_tgi_generate_route_in_tgi_shape(mesh):
    status, body = _post(
        mesh,
        "/generate",
        json.dumps(
            {
                "inputs": "The capital of France is",
                "parameters": {
                    "adapter_id": "json",
                    "max_new_tokens": 4,
                    "details": True,
                    "decoder_input_details": True,
                },
            }
        ),
    )
    assert status == 200
    details = body["details"]
    assert details["generated_tokens"] == 4 and len(details["tokens"]) == 4
    assert details["prefill"] and details["prefill"][0]["logprob"] is None
    assert {"id", "text", "logprob", "special"} <= set(details["tokens"][0])


@pytest.mark.parametrize(
    ("path", "body", "status", "hint"),
    [
        ("/v1/chat/completions", "{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", {"model": BASE, "messages": []}, 400, "messages is empty"),
        ("/v1/chat/completions", {"model": BASE, "messages": "hello"}, 400, "messages"),
        ("/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        (
            "/v1/completions",
            {"model": BASE, "prompt": "hi", "max_tokens": 100000},
            400,
            "maximum context length",
        ),
        ("/v1/completions", {"model": BASE, "prompt": "hi", "temperature": -1}, 400, "temperature"),
        (
            "/v1/chat/completions",
            {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "stream_options": {}},
            400,
            "stream_options is only allowed with stream: true",
        ),
        ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}, 404, "GET /v1/models"),
        (
            "/v1/completions",
            {"model": "no-such-model", "prompt": "hi", "stream": True},
            404,
            "does not exist",
        ),
        ("/v1/completions", {"prompt": "hi"}, 400, "model"),
        ("/v1/completions", {"model": BASE, "prompt": "hi", "n": 0}, 400, "n"),
        ("/v1/completions", {"model": BASE, "prompt": ""}, 400, "a prompt is empty"),
        ("/v1/completions", {"model": BASE, "prompt": ["hi", ""]}, 400, "a prompt is empty"),
        # past the gRPC fields' 32 bits: named, not a 500
        ("/v1/completions", {"model": BASE, "prompt": [-1]}, 400, "prompt"),
        ("/v1/completions", {"model": BASE, "prompt": [[2**40]]}, 400, "prompt"),
        ("/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 2**40}, 400, "max_tokens"),
        ("/v1/completions", {"model": BASE, "prompt": "hi", "top_k": 2**40}, 400, "top_k"),
    ],
)
def test_bad_input_gets_a_4xx_in_openai_shape(mesh, path, body, status, hint):
    got, payload = _post(mesh, path, body if isinstance(body, str) else json.dumps(body))
    assert got == status, payload
    assert hint in payload["error"]["message"]
    assert payload["error"]["type"]


def test_the_sdk_passing_none_for_an_argument_gets_its_default(client):
    """openai-python sends an argument passed as None as JSON null, which OpenAI's API and vLLM's
    take as the default; `n`, `stream`, `logprobs` and `echo` were 400s ("should be a valid integer")."""
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(
        model=BASE, messages=messages, max_tokens=2, n=None, stream=None, logprobs=None
    )
    assert len(chat.choices) == 1 and chat.choices[0].logprobs is None
    completion = client.completions.create(
        model=BASE, prompt="Hi", max_tokens=2, n=None, stream=None, echo=None, logprobs=None
    )
    assert len(completion.choices) == 1 and not completion.choices[0].text.startswith("Hi")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        # the shard refused these, and its 400 named no field
        ({"stop": [""]}, "stop"),
        ({"stop": ""}, "stop"),
        # a value matching neither member of a union was located under a member: `stop.str`
        ({"stop": ["x"] * 17}, "stop"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    ],
)
def test_a_bad_field_is_a_bad_request_error_whose_param_names_it(client, extra, param):
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**body)
    assert raised.value.param == param, raised.value.body


def test_each_answer_carries_a_request_id_the_sdk_reads(client):
    raw = client.chat.completions.with_raw_response.create(
        model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert raw.request_id and raw.parse().choices
    sent = client.models.with_raw_response.list(extra_headers={"X-Request-Id": "trace-me-42"})
    assert sent.request_id == "trace-me-42"
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.request_id


def test_a_request_past_the_context_gets_each_apis_own_context_error(mesh, client):
    """Client libraries match on these to trim a conversation and retry: OpenAI's code
    `context_length_exceeded` and its 'maximum context length' wording (LiteLLM, CrewAI), TGI's
    'Input validation error'. They got the shard's gRPC wording, naming `max_new_tokens`."""
    with grpc.insecure_channel(next(iter(mesh.shards.values()))) as channel:
        status = shard_pb2_grpc.ShardStub(channel).Status(shard_pb2.ShardStatusRequest(), timeout=10)
    context = status.max_context
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=BASE, prompt="Hello", max_tokens=context)
    error = raised.value
    assert (error.code, error.param) == ("context_length_exceeded", "prompt")
    assert error.body["message"].startswith(
        f"This model's maximum context length is {context} tokens. However, you requested "
    )
    assert f"in the prompt, {context} in the completion). Please reduce" in error.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "word " * context}], stream=True
        )
    error = raised.value
    assert (error.code, error.param) == ("context_length_exceeded", "messages")
    assert error.body["message"].endswith("tokens. Please reduce the length of the messages.")
    status_code, body = _post(
        mesh, "/generate", json.dumps({"inputs": "Hello", "parameters": {"max_new_tokens": context}})
    )
    assert status_code == 422 and body["error_type"] == "validation"
    assert body["error"].startswith(
        f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {context}. Given: "
    )


def test_tgi_bad_input_gets_422_in_tgi_shape(mesh):
    status, body = _post(
        mesh, "/generate", json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": -3}})
    )
    assert status == 422
    assert body["error_type"] == "validation" and "max_new_tokens" in body["error"]
    status, body = _post(
        mesh, "/generate", json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 2**40}})
    )
    assert status == 422 and "max_new_tokens" in body["error"]
    status, body = _post(
        mesh, "/generate", json.dumps({"inputs": "hi", "parameters": {"adapter_id": "nope"}})
    )
    assert status == 404 and "nope" in body["error"]
    # TGI's words, not the router's ("set exactly one of `prompt` ... or `prompt_token_ids`")
    status, body = _post(mesh, "/generate", json.dumps({"inputs": "", "parameters": {"max_new_tokens": 2}}))
    assert (status, body["error"]) == (422, "Input validation error: `inputs` cannot be empty")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"logit_bias": {"1": 100}}, "logit_bias"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", {"continue_final_message": True}, "continue_final_message"),
        ("/v1/chat/completions", {"min_p": 0.1}, "min_p"),
        ("/v1/completions", {"logit_bias": {"1": -100}}, "logit_bias"),
        ("/v1/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/completions", {"min_tokens": 4}, "min_tokens"),
        ("/generate", {"typical_p": 0.5}, "typical_p"),
        ("/generate", {"watermark": True}, "watermark"),
        ("/generate", {"truncate": 2}, "truncate"),
        ("/generate", {"frequency_penalty": 1.5}, "frequency_penalty"),
    ],
)
def test_a_parameter_loraplex_cannot_honour_is_refused_naming_it_not_ignored(mesh, path, body, param):
    if path == "/generate":
        got, payload = _post(mesh, path, json.dumps({"inputs": "hi", "parameters": body}))
        assert got == 422 and payload["error_type"] == "validation", payload
        assert param in payload["error"]
        return
    request = {"model": BASE, "max_tokens": 2, **body}
    request |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    got, payload = _post(mesh, path, json.dumps(request))
    assert got == 400, payload
    assert payload["error"]["param"] == param and param in payload["error"]["message"]


def test_a_refusable_parameter_at_its_off_value_is_accepted(mesh, client):
    chat = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        temperature=0,  # sampled, two tokens may both read empty (a special token, part of a character)
        logit_bias={},
        tool_choice="auto",
        extra_body={"min_p": 0, "skip_special_tokens": True},
    )
    assert chat.choices[0].message.content
    status, _ = _post(
        mesh,
        "/generate",
        json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 2, "watermark": False}}),
    )
    assert status == 200


def test_stop_token_ids_end_the_completion(client):
    plain = client.completions.create(
        model=BASE, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert plain.choices[0].text.startswith(" Paris.")
    period = 30  # "." in SmolLM2's vocabulary
    stopped = client.completions.create(
        model=BASE,
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
        extra_body={"stop_token_ids": [period]},
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == " Paris" and stopped.usage.completion_tokens == 2


def test_tgi_samples_when_top_p_or_top_k_is_set_and_is_greedy_at_temperature_one(mesh):
    """TGI's rule: a logits warper (temperature != 1, top_k, top_p < 1) turns sampling on; without one
    and without do_sample it decodes greedily."""
    tgi = InferenceClient(model=mesh.gateway, timeout=120)
    prompt = "Once upon a time"
    greedy = tgi.text_generation(prompt, max_new_tokens=12)
    for warper in ({"top_p": 0.9}, {"top_k": 20}):
        texts = {tgi.text_generation(prompt, max_new_tokens=12, seed=seed, **warper) for seed in range(4)}
        assert len(texts) > 1, f"{warper} was ignored: every seed gave the same text"
        again = tgi.text_generation(prompt, max_new_tokens=12, seed=0, **warper)
        assert again == tgi.text_generation(prompt, max_new_tokens=12, seed=0, **warper)
    assert tgi.text_generation(prompt, max_new_tokens=12, temperature=1.0, seed=1) == greedy


def test_tgi_details_report_the_seed_that_replays_a_sampled_answer(mesh):
    """As TGI: sampling without a seed draws one and reports it; greedy decoding reports none."""
    tgi = InferenceClient(model=mesh.gateway, timeout=120)
    prompt = "Once upon a time"
    sampled = tgi.text_generation(prompt, max_new_tokens=12, do_sample=True, details=True)
    assert isinstance(sampled.details.seed, int)
    replay = tgi.text_generation(prompt, max_new_tokens=12, do_sample=True, seed=sampled.details.seed)
    assert replay == sampled.generated_text
    streamed = list(tgi.text_generation(prompt, max_new_tokens=4, do_sample=True, details=True, stream=True))
    assert isinstance(streamed[-1].details.seed, int)
    assert tgi.text_generation(prompt, max_new_tokens=4, details=True).details.seed is None


def test_tgi_generated_text_keeps_the_stop_sequence_as_tgi_does(mesh):
    tgi = InferenceClient(model=mesh.gateway, timeout=120)
    prompt = "The capital of France is"
    output = tgi.text_generation(prompt, max_new_tokens=8, stop=["."], details=True)
    assert output.details.finish_reason == "stop_sequence"
    assert output.generated_text == " Paris."
    assert output.generated_text == "".join(token.text for token in output.details.tokens)
    events = list(tgi.text_generation(prompt, max_new_tokens=8, stop=["."], details=True, stream=True))
    assert events[-1].generated_text == " Paris."


def test_inference_client_chat_completion_works_unchanged(mesh, client):
    """Given the gateway's URL, InferenceClient sends `"model": "dummy"` (TGI's users write "tgi"):
    both mean the base model, as TGI serves its one model whatever the field says."""
    messages = [{"role": "user", "content": FRANCE}]
    expected = client.chat.completions.create(model=BASE, messages=messages, max_tokens=8, temperature=0)
    tgi = InferenceClient(mesh.gateway, timeout=120)
    reply = tgi.chat_completion(messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == expected.choices[0].message.content
    streamed = tgi.chat_completion(messages, max_tokens=8, temperature=0, stream=True)
    content = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert content == expected.choices[0].message.content
    adapted = tgi.chat_completion(messages, model="uppercase", max_tokens=8, temperature=0)
    assert adapted.choices[0].message.content.isupper()


def test_tgi_info_and_a_stream_refusing_decoder_input_details(mesh):
    info = InferenceClient(mesh.gateway, provider="hf-inference").get_endpoint_info()
    assert info["model_id"] == BASE and info["max_stop_sequences"] >= 1
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2, "decoder_input_details": True}}
    status, payload = _post(mesh, "/generate_stream", json.dumps(body))
    assert status == 422 and "decoder_input_details" in payload["error"]


def test_client_disconnect_cancels_the_generation_on_the_shard(mesh):
    host, port = mesh.gateway.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": BASE, "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    connection.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    assert _running_on_shards(mesh) == 1
    connection.close()
    deadline = time.monotonic() + 10
    while _running_on_shards(mesh) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running_on_shards(mesh) == 0, "the shard kept generating for a client that left"


def test_client_disconnect_cancels_a_whole_response_request_too(mesh):
    host, port = mesh.gateway.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": BASE, "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True}
    connection.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    deadline = time.monotonic() + 10
    while not _running_on_shards(mesh) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _running_on_shards(mesh) == 1
    connection.close()
    deadline = time.monotonic() + 10
    while _running_on_shards(mesh) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running_on_shards(mesh) == 0, "the shard kept generating for a client that left"


def _running_on_shards(mesh) -> int:
    total = 0
    for address in mesh.shards.values():
        with grpc.insecure_channel(address) as channel:
            status = shard_pb2_grpc.ShardStub(channel).Status(shard_pb2.ShardStatusRequest(), timeout=5)
            total += status.running_requests + status.waiting_requests
    return total


def test_async_completion_is_queued_then_picked_up(mesh, client):
    body = {"model": "uppercase", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    status, submitted = _post(mesh, "/v1/async/completions", json.dumps(body))
    assert status == 202 and submitted["status"] == "queued"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{mesh.gateway}/v1/async/jobs/{submitted['id']}", timeout=5) as response:
            job = json.load(response)
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    direct = client.completions.create(**body)
    assert job["result"]["choices"][0]["text"] == direct.choices[0].text
    assert job["result"]["usage"]["completion_tokens"] == direct.usage.completion_tokens
    status, error = _post(mesh, "/v1/async/completions", json.dumps({**body, "model": "nope"}))
    assert status == 404 and "does not exist" in error["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{mesh.gateway}/v1/async/jobs/0123456789abcdef", timeout=5)
    assert missing.value.code == 404


def test_health_and_metrics(mesh):
    """Makes the requests whose counters it checks, so it passes on its own and in any order."""
    chat = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _post(mesh, "/v1/chat/completions", json.dumps(chat))[0] == 200
    assert _post(mesh, "/v1/chat/completions", json.dumps({**chat, "model": "no-such-model"}))[0] == 404
    with urllib.request.urlopen(f"{mesh.gateway}/health", timeout=5) as response:
        assert json.load(response)["status"] == "ok"
    with urllib.request.urlopen(f"{mesh.gateway}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'loraplex_gateway_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "loraplex_gateway_time_to_first_byte_seconds_bucket" in text
    assert 'status="404"' in text


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample at url as (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_every_component_exports_its_metrics_after_the_workload(mesh):
    """Runs after the tests above: adapters were loaded, requests finished, failed and were cancelled."""
    shard = _scrape(mesh.metrics["shard"])
    assert _value(shard, "loraplex_shard_requests_total", adapter="uppercase", outcome="ok") >= 3
    assert _value(shard, "loraplex_shard_requests_total", adapter="base", outcome="cancelled") >= 2
    assert _value(shard, "loraplex_shard_time_to_first_token_seconds_count", adapter="json") >= 1
    assert _value(shard, "loraplex_shard_time_per_output_token_seconds_count", adapter="base") >= 1
    assert _value(shard, "loraplex_shard_kv_blocks_free") > 0
    assert _value(shard, "loraplex_shard_rank_weight_bytes", rank="0") > 100 * 2**20  # SmolLM2, one rank
    assert _value(shard, "loraplex_shard_rank_kv_cache_bytes", rank="0") > 0
    assert _value(shard, "loraplex_shard_running_requests") == 0
    assert _value(shard, "loraplex_adapters", tier="cpu") == 2  # uppercase and json
    for tier in ("disk", "cpu", "gpu"):
        loads = _value(shard, "loraplex_adapter_load_seconds_count", tier=tier)
        misses = _value(shard, "loraplex_adapter_tier_misses_total", tier=tier)
        assert loads == misses == _value(shard, "loraplex_adapter_load_seconds_bucket", tier=tier, le="+Inf")
        # the disk cache may outlive a run (keyed by checksum), so its two adapters may be hits
        assert misses + _value(shard, "loraplex_adapter_tier_hits_total", tier=tier) >= 2, tier
    assert _value(shard, "loraplex_adapter_tier_misses_total", tier="cpu") == 2
    assert _value(shard, "loraplex_adapter_tier_hits_total", tier="cpu") >= 3

    router = _scrape(mesh.metrics["router"])
    assert _value(router, "loraplex_router_requests_total", adapter="uppercase", code="OK") >= 3
    assert _value(router, "loraplex_router_requests_total", adapter="unknown", code="NOT_FOUND") >= 1
    decisions = {
        dict(labels)["reason"]: value
        for (name, labels), value in router.items()
        if name == "loraplex_router_decisions_total"
    }
    assert decisions.get("affinity", 0) + decisions.get("home", 0) >= 5, decisions
    assert decisions.get("base", 0) >= 3, decisions
    assert _value(router, "loraplex_router_live_shards") == 1
    assert _value(router, "loraplex_router_catalogue_adapters") == 2

    worker = _scrape(mesh.metrics["worker"])
    assert _value(worker, "loraplex_jobs_completed_total") >= 1
    deadline = time.monotonic() + 5  # the worker samples the backlog once a second
    while _value(worker, "loraplex_jobs_backlog") and time.monotonic() < deadline:
        time.sleep(0.2)
        worker = _scrape(mesh.metrics["worker"])
    assert _value(worker, "loraplex_jobs_backlog") == 0


def test_without_a_router_the_gateway_answers_503_not_a_hang(tmp_path):
    port, dead_router = free_port(), f"127.0.0.1:{free_port()}"
    gateway = spawn(
        loraplex_command("gateway", "--router", dead_router, "--port", str(port), "--request-timeout", "5"),
        tmp_path / "gateway.log",
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # /health is 503 until a router answers, so wait for the port instead
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    pass
            except urllib.error.HTTPError as error:
                assert error.code == 503
                break
            except OSError:
                assert time.monotonic() < deadline and gateway.poll() is None, "the gateway did not start"
                time.sleep(0.2)
        mesh = type("Gateway", (), {"gateway": f"http://127.0.0.1:{port}"})
        body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        started = time.monotonic()
        status, payload = _post(mesh, "/v1/chat/completions", json.dumps(body))
        assert status == 503 and payload["error"]["type"] == "service_unavailable"
        assert time.monotonic() - started < 10
    finally:
        gateway.terminate()
        gateway.wait(timeout=15)

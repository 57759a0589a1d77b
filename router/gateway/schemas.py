"""Request bodies of the OpenAI and TGI routes. Fields clients send that loraplex does not use are
ignored, as OpenAI-compatible servers do, unless they would change the answer: those (`REFUSED_*`) are a
400 naming the field when set to anything but their "off" value, never silently dropped. A known field
with a wrong type or range is a 400 that names the field. Extensions beyond OpenAI's fields (top_k,
repetition_penalty, ignore_eos, stop_token_ids) follow vLLM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from loraplex.shard.sampling_limits import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, REPETITION_PENALTY_RANGE

MAX_N = 16
MAX_STOP = MAX_STOP_STRINGS  # the shard's cap on stop strings; stop token ids take the same
UINT32_MAX = 2**32 - 1  # the gRPC fields' width: a count or token id past it is a 400, not a 500

Count = Annotated[int, Field(ge=1, le=UINT32_MAX)]  # max_tokens and its kin
TokenId = Annotated[int, Field(ge=0, le=UINT32_MAX)]
# the shard's range (1 = off, > 1 penalises), so a value it would refuse is the client's 400 here
RepetitionPenalty = Annotated[float, Field(ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])]

# Fields of OpenAI's API, vLLM's or TGI's that loraplex cannot honour, each with the values that leave
# the answer as loraplex gives it (absent, off, the default).
REFUSED_SAMPLING = {
    "logit_bias": (None, {}),
    "min_p": (None, 0),
    "min_tokens": (None, 0),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "allowed_token_ids": (None, []),
    "bad_words": (None, []),
    "logits_processors": (None, []),
    "prompt_logprobs": (None,),
    "truncate_prompt_tokens": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
}
REFUSED_COMPLETION = {**REFUSED_SAMPLING, "response_format": (None, {"type": "text"})}
REFUSED_CHAT = {
    **REFUSED_SAMPLING,
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "best_of": (None, 1),
    "echo": (None, False),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "documents": (None, []),
}
REFUSED_TGI = {
    "typical_p": (None, 1),
    "watermark": (None, False),
    "truncate": (None,),
    "frequency_penalty": (None, 0),
}


def refused_field(extra: Mapping[str, Any] | None, refused: Mapping[str, tuple]) -> str | None:
    """The first field in a body's undeclared fields that is refused and not at an "off" value."""
    for name, value in (extra or {}).items():
        if name in refused and value not in refused[name]:
            return name
    return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's usage on every chunk: refused, not honoured


class SamplingFields(BaseModel):
    """What completions and chat share; undeclared fields are kept, to refuse those in REFUSED_*."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Count | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1, le=UINT32_MAX)] | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None

    @field_validator("n", "stream", "logprobs", "echo", mode="before", check_fields=False)
    @classmethod
    def _null_is_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        """OpenAI's API (and vLLM's) takes `null` for these as "the default", and the SDKs send it for
        an argument passed as None."""
        return cls.model_fields[info.field_name].default if value is None else value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class AsyncCompletionRequest(CompletionRequest):
    callback_url: str | None = None  # the job's outcome is POSTed there once stored (router/worker.py)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None


class TGIParameters(BaseModel):
    model_config = ConfigDict(extra="allow")  # to refuse those in REFUSED_TGI

    adapter_id: str | None = None
    max_new_tokens: Count | None = None
    do_sample: bool = False
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=UINT32_MAX)] | None = None
    seed: int | None = None
    stop: Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    repetition_penalty: RepetitionPenalty | None = None
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool | None = None
    top_n_tokens: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    best_of: int | None = None
    grammar: dict | None = None


class TGIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False

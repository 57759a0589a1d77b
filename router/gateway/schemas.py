"""Request bodies of the OpenAI and TGI routes. Fields clients send that loraplex does not use are
ignored, as OpenAI-compatible servers do; a known field with a wrong type or range is a 400 that names
the field. Extensions beyond OpenAI's fields (top_k, repetition_penalty, ignore_eos) follow vLLM."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplex.shard.sampling_limits import MAX_TOP_LOGPROBS, REPETITION_PENALTY_RANGE

MAX_N = 16
MAX_STOP = 16
UINT32_MAX = 2**32 - 1  # the gRPC fields' width: a count or token id past it is a 400, not a 500

Count = Annotated[int, Field(ge=1, le=UINT32_MAX)]  # max_tokens and its kin
TokenId = Annotated[int, Field(ge=0, le=UINT32_MAX)]
# the shard's range (1 = off, > 1 penalises), so a value it would refuse is the client's 400 here
RepetitionPenalty = Annotated[float, Field(ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="ignore")

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
    model_config = ConfigDict(extra="ignore")

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

"""The check of which prompt input a GenerateRequest carries. Free of torch, so the router's
Jobs/Submit refuses a request the shard would refuse before it queues it."""

from __future__ import annotations

from loraplex.protos.v1 import common_pb2

# The roles ChatMessage documents, as the gateway sends them (OpenAI's "developer" goes as "system"):
# a chat template renders any other string as a turn header the model was never trained on.
CHAT_ROLES = ("system", "user", "assistant")


def check_inputs(request: common_pb2.GenerateRequest) -> None:
    """Raise ValueError, saying what to send instead, unless exactly one input is set, every message
    has a documented role, and apply_chat_template goes with `prompt`, the only input it changes."""
    inputs = [bool(request.prompt), bool(request.messages), bool(request.prompt_token_ids)]
    if sum(inputs) != 1:
        raise ValueError("set exactly one of `prompt` (non-empty text), `messages` or `prompt_token_ids`")
    if request.apply_chat_template and request.messages:
        raise ValueError(
            "apply_chat_template renders `prompt` as a user turn; `messages` always go through the "
            "chat template: leave apply_chat_template unset"
        )
    if request.apply_chat_template and request.prompt_token_ids:
        raise ValueError(
            "apply_chat_template renders `prompt` as a user turn; `prompt_token_ids` are used as "
            "given: render the chat yourself, or send its text as `prompt`"
        )
    for index, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            raise ValueError(
                f"messages[{index}].role must be one of {', '.join(map(repr, CHAT_ROLES))}, "
                f"got {message.role!r}"
            )

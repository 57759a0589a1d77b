"""Prompt inputs: a chat template that refuses the messages, or a role the contract does not name, is the
caller's error, named as such."""

import shutil

import pytest

from loraplex.protos.v1 import common_pb2
from loraplex.shard.prompts import PromptEncoder
from loraplex.shard.request_inputs import check_inputs

# Like Mistral's and Llama 2's templates: no system role, and roles must alternate.
STRICT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{{ message['role'] + ': ' + message['content'] + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}"
)


def test_messages_the_chat_template_refuses_are_a_value_error_naming_the_templates_reason(
    tiny_model_dir, tmp_path
):
    """jinja2's TemplateError is not a ValueError: it escaped the service's checks and reached the
    caller as an internal error (a 500 from the gateway) instead of INVALID_ARGUMENT (a 400)."""
    model_dir = tmp_path / "strict"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    prompts = PromptEncoder(model_dir, vocab_size=49152, max_context=2048)
    assert prompts.encode_chat([("user", "hi")])
    with pytest.raises(ValueError, match="the model's chat template refused these messages: System role"):
        prompts.encode_chat([("system", "be brief"), ("user", "hi")])
    with pytest.raises(ValueError, match="Conversation roles must alternate"):
        prompts.encode_chat([("user", "hi"), ("user", "again")])


@pytest.mark.parametrize("role", ["wizard", "", "tool", "developer", "User"])
def test_a_role_chat_message_does_not_document_is_refused_naming_the_message(role):
    """SmolLM2's template renders any role as a turn header ('<|im_start|>wizard'): the shard served a
    prompt the model was never trained on, where the gateway answers 400 for the same messages."""

    def request(*roles: str) -> common_pb2.GenerateRequest:
        return common_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role=r, content="hi") for r in roles]
        )

    with pytest.raises(
        ValueError, match=rf"messages\[1\].role must be one of 'system', 'user', 'assistant', got '{role}'"
    ):
        check_inputs(request("system", role, "user"))
    check_inputs(request("system", "user", "assistant", "user"))

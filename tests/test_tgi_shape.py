"""TGI's answer built from a generation, without a mesh: generated_text after a stop sequence, and
top tokens marked special."""

from loraplex.protos.v1 import common_pb2
from loraplex.router.gateway.schemas import TGIRequest
from loraplex.router.gateway.tgi_api import _generated, _top_tokens


def test_generated_text_after_a_stop_keeps_multibyte_characters_whole():
    """It was rebuilt from the token texts, where a token holding part of a character reads '\\ufffd':
    ' ���本��� END' where TGI answers ' 日本語 END'. The shard now sends the text the stop cut off."""
    response = common_pb2.GenerateResponse(
        text=" 日本語 ",
        tokens=[
            common_pb2.Token(id=i, text=text) for i, text in enumerate([" \ufffd", "本", "\ufffd", " E"])
        ],
        finish_reason=common_pb2.FINISH_REASON_STOP,
        stop_text="END",
    )
    body = TGIRequest(inputs="Say it:", parameters={"stop": ["END"]})
    assert _generated(body, response)["generated_text"] == " 日本語 END"
    full = TGIRequest(inputs="Say it:", parameters={"stop": ["END"], "return_full_text": True})
    assert _generated(full, response)["generated_text"] == "Say it: 日本語 END"


def test_a_special_top_token_is_marked_special():
    """TGI marks special tokens among the alternatives too; every one read `special: false`."""
    token = common_pb2.Token(
        id=5,
        text=" Paris",
        top_logprobs=[
            common_pb2.TopLogprob(id=5, text=" Paris", logprob=-0.1),
            common_pb2.TopLogprob(id=2, text="<|im_end|>", logprob=-2.5, special=True),
        ],
    )
    assert [top["special"] for top in _top_tokens(token)] == [False, True]

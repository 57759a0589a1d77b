"""The gateway's error handlers on their own: an unexpected exception still reaches the client as JSON
in the shape its SDK parses (OpenAI's under /v1, TGI's elsewhere), never as a bare text/plain 500."""

from fastapi import FastAPI
from fastapi.testclient import TestClient

from loraplex.router.gateway.errors import install_error_handlers


def _failing_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    async def broken() -> None:
        raise ValueError("a bug")

    app.post("/v1/completions")(broken)
    app.post("/generate")(broken)
    return app


def test_an_unexpected_error_is_a_500_in_the_callers_shape():
    client = TestClient(_failing_app(), raise_server_exceptions=False)
    openai = client.post("/v1/completions", json={})
    assert openai.status_code == 500 and openai.headers["content-type"] == "application/json"
    error = openai.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "ValueError" in error["message"] and "log" in error["message"]
    tgi = client.post("/generate", json={})
    assert tgi.status_code == 500 and tgi.json()["error_type"] == "generation"

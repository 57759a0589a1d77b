"""Async completions: submit now (202 with a job id), pick up later. The router's Jobs service queues
the request on a Redis Stream; `loraplex worker` runs it and stores the result."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from loraplex.protos.v1 import common_pb2, jobs_pb2
from loraplex.router.gateway.backend import RouterClient
from loraplex.router.gateway.convert import OPENAI_FINISH, ModelNames, not_found_hint
from loraplex.router.gateway.errors import HTTP_STATUS, OPENAI_TYPES, APIError, openai_context_error
from loraplex.router.gateway.openai_api import completion_choices
from loraplex.router.gateway.schemas import AsyncCompletionRequest
from loraplex.shard.context_limits import ContextExceeded

STATES = {
    jobs_pb2.JOB_STATE_QUEUED: "queued",
    jobs_pb2.JOB_STATE_RUNNING: "running",
    jobs_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    jobs_pb2.JOB_STATE_FAILED: "failed",
}


def build_router(client: RouterClient, names: ModelNames) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/async/completions", status_code=202)
    async def submit(body: AsyncCompletionRequest) -> JSONResponse:
        if body.stream or body.n != 1:
            raise APIError.bad_request("an async completion takes one prompt, n = 1 and no stream")
        for param, asked in (("logprobs", body.logprobs is not None), ("echo", body.echo)):
            if asked:  # the job's result is the completion text alone: refuse rather than drop it
                raise APIError.bad_request(
                    f"{param} is not supported on async completions; use POST /v1/completions", param
                )
        choices = completion_choices(body, names)
        if len(choices.requests) != 1:
            raise APIError.bad_request("an async completion takes a single prompt", "prompt")
        try:
            job_id = await client.submit_job(choices.requests[0], body.callback_url or "")
        except APIError as error:
            raise not_found_hint(error, body.model, names) from error
        return JSONResponse(
            {"id": job_id, "object": "async.job", "status": "queued", "model": body.model}, status_code=202
        )

    @api.get("/v1/async/jobs/{job_id}")
    async def get(job_id: str) -> dict:
        try:
            job = await client.get_job(job_id)
        except APIError as error:
            if error.status == 404:  # the router's NOT_FOUND here is about the job, not a model
                raise APIError(404, error.message, param="job_id", code="job_not_found") from error
            raise
        return job_to_dict(job)

    return api


def job_to_dict(job: jobs_pb2.Job) -> dict:
    result: dict = {
        "id": job.job_id,
        "object": "async.job",
        "status": STATES.get(job.state, "unknown"),
        "created_at": job.created_at.seconds if job.HasField("created_at") else None,
        "finished_at": job.finished_at.seconds if job.HasField("finished_at") else None,
        "result": None,
        "error": None,
    }
    if job.state == jobs_pb2.JOB_STATE_SUCCEEDED:
        result["result"] = _completion(job.result)
    elif job.state == jobs_pb2.JOB_STATE_FAILED:
        status = next((http for code, http in HTTP_STATUS.items() if code.name == job.error.code), 500)
        result["error"] = {
            "message": job.error.message,
            "type": OPENAI_TYPES.get(status, "server_error"),
            "code": job.error.code.lower() or None,
        }
        context = ContextExceeded.parse(job.error.message) if job.error.code == "INVALID_ARGUMENT" else None
        if context is not None:  # as /v1/completions would have answered
            result["error"] |= openai_context_error(context, "prompt")
    return result


def _completion(response: common_pb2.GenerateResponse) -> dict:
    usage = response.usage
    return {
        "object": "text_completion",
        "choices": [
            {
                "index": 0,
                "text": response.text,
                "logprobs": None,
                "finish_reason": OPENAI_FINISH.get(response.finish_reason),
            }
        ],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
        "served_by": {
            "shard": response.served_by.shard,
            "adapter_version": response.served_by.adapter_version,
        },
    }

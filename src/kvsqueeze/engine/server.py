"""The OpenAI-compatible HTTP server: /v1/completions and /v1/chat/completions (with
SSE streaming), /v1/models, /health and /metrics, over an AsyncLLMEngine.

Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with
400 for bad requests, 401 without the API key, 404 for another model's name; a bad
request never disturbs the others. A client that disconnects mid-stream aborts its
request (AsyncLLMEngine.generate's cleanup), so its blocks go back to the pool.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvsqueeze.engine.async_engine import AsyncLLMEngine, RequestStream
from kvsqueeze.engine.chat_template import apply_chat_template
from kvsqueeze.engine.protocol import ChatCompletionRequest, CompletionRequest, _Common
from kvsqueeze.engine.sampling_params import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def build_app(engine: AsyncLLMEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="kvsqueeze", version="1")
    llm = engine.engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(
            400,
            f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}",
            "invalid_request_error",
            where or None,
        )

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "invalid or missing API key", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok" if engine.error is None else f"engine error: {engine.error}"}

    @app.get("/metrics")
    async def metrics() -> Response:
        await asyncio.get_running_loop().run_in_executor(None, engine.call, llm.refresh_gauges)
        return Response(llm.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "kvsqueeze"}
        return {"object": "list", "data": [card]}

    def _prepare(body: _Common, prompt_ids: list[int], max_tokens: int | None):
        if body.model is not None and body.model != model_name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {model_name!r}",
                "not_found_error",
                "model",
            )
        if not prompt_ids:
            raise APIError(400, "empty prompt: give at least one token", param="prompt")
        room = llm.max_model_len - len(prompt_ids)
        if room < 1:
            raise APIError(
                400, f"prompt of {len(prompt_ids)} tokens does not fit the model's {llm.max_model_len}", param="prompt"
            )
        if max_tokens is not None and max_tokens > room:
            raise APIError(
                400,
                f"max_tokens={max_tokens} with a {len(prompt_ids)}-token prompt passes the model's context "
                f"of {llm.max_model_len}",
                param="max_tokens",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            params = SamplingParams(
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=body.seed,
                max_tokens=max_tokens or min(16 if isinstance(body, CompletionRequest) else room, room),
                stop=stop,
                stop_token_ids=list(body.stop_token_ids or []),
                ignore_eos=body.ignore_eos,
            )
            policy = llm.policy_for(body.kv_policy, body.kv_keep, body.kv_tokens)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        return params, policy

    async def _respond(body: _Common, prompt_ids: list[int], params, policy, chat: bool, prefix_len: int = 0):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        prefix, rest = (prompt_ids[:prefix_len], prompt_ids[prefix_len:]) if prefix_len else (None, prompt_ids)
        try:
            stream = await engine.add(rest, params, policy, body.kv_max_tokens, prefix)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        if body.stream:
            return StreamingResponse(_sse(rid, created, stream, chat), media_type="text/event-stream")
        try:
            outputs = [item async for item in stream]
        finally:
            await stream.aclose()
        out = outputs[-1].outputs[0]
        choice = {"index": 0, "finish_reason": out.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice["text"] = out.text
        usage = {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(out.token_ids),
            "total_tokens": len(prompt_ids) + len(out.token_ids),
        }
        kind = "chat.completion" if chat else "text_completion"
        return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice], "usage": usage}

    async def _sse(rid: str, created: int, stream: RequestStream, chat: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        first = True
        try:
            async for item in stream:
                out = item.outputs[0]
                if chat:
                    delta = {"content": item.delta}
                    if first:
                        delta["role"] = "assistant"
                    choice = {"index": 0, "delta": delta, "finish_reason": out.finish_reason}
                else:
                    choice = {"index": 0, "text": item.delta, "finish_reason": out.finish_reason, "logprobs": None}
                first = False
                chunk = {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # a disconnected client closes us: close the request now, which aborts it
            await stream.aclose()

    def _prefix_ids(body: _Common) -> list[int]:
        ids = llm.tokenizer.encode(body.kv_prefix) if body.kv_prefix else []
        if body.kv_prefix is not None and not ids:
            raise APIError(400, "kv_prefix is empty: give the shared document, or leave it out", param="kv_prefix")
        return ids

    def _chat_ids(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        try:
            return apply_chat_template(llm.tokenizer, messages, add_generation_prompt)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prefix = _prefix_ids(body)
        if isinstance(body.prompt, str):  # after a prefix, the prompt continues it: no second BOS
            ids = llm.tokenizer.encode(body.prompt, add_special_tokens=not prefix) if body.prompt else []
        else:
            ids = list(body.prompt)
            if any(not 0 <= t < llm.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {llm.vocab_size})", param="prompt")
        if prefix and not ids:
            raise APIError(400, "empty prompt: a request with kv_prefix needs a prompt after it", param="prompt")
        params, policy = _prepare(body, prefix + ids, body.max_tokens)
        return await _respond(body, prefix + ids, params, policy, chat=False, prefix_len=len(prefix))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        messages = [m.model_dump() for m in body.messages]
        prefix: list[int] = []
        if _prefix_ids(body):
            # The document opens the conversation as a system message; its rendering is
            # the shared prefix, which the template must leave unchanged by what follows.
            document = [{"role": "system", "content": body.kv_prefix}]
            prefix, messages = _chat_ids(document, add_generation_prompt=False), document + messages
        ids = _chat_ids(messages)
        if ids[: len(prefix)] != prefix:
            raise APIError(
                400,
                "this model's chat template renders the kv_prefix system message differently once other "
                "messages follow, so it cannot be shared: use /v1/completions with kv_prefix",
                param="kv_prefix",
            )
        params, policy = _prepare(body, ids, body.max_completion_tokens or body.max_tokens)
        return await _respond(body, ids, params, policy, chat=True, prefix_len=len(prefix))

    return app

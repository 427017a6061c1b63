"""The OpenAI-compatible server over a tiny random model, driven by the real `openai`
client and by raw HTTP: completions, chat, streaming, per-request policy, errors in
OpenAI's shape, API keys, metrics, and a bounded load test with cancellations after
which the block pool is whole."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from kvsqueeze.engine.async_engine import AsyncLLMEngine
from kvsqueeze.engine.chat_template import apply_chat_template
from kvsqueeze.engine.llm_engine import EngineArgs, LLMEngine
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.engine.server import build_app
from kvsqueeze.hf.tiny import save_folder, spread_weights, tiny_model
from kvsqueeze.policy import make_policy

KEY = "sk-test"


class Served:
    def __init__(self, path, kv_memory: int | str = "64MiB", api_key: str | None = KEY) -> None:
        self.engine = LLMEngine(
            EngineArgs(model=str(path), policy="snapkv", keep=0.5, window=4, dtype="fp32", kv_memory=kv_memory)
        )
        self.async_engine = AsyncLLMEngine(self.engine)
        app = build_app(self.async_engine, "tiny", api_key=api_key)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.async_engine.shutdown()

    def pool_whole(self) -> bool:
        return self.async_engine.call(self.engine.blocks.is_whole)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = tiny_model("llama", max_positions=1024, seed=4)
    spread_weights(model)
    path = tmp_path_factory.mktemp("served")
    save_folder(model, path)
    return path


@pytest.fixture(scope="module")
def served(model_dir):
    s = Served(model_dir)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)


def _offline(served: Served, prompt: str, max_tokens: int, policy=None) -> str:
    """The same request through the engine directly (greedy): what the server must return."""

    def run():
        engine = served.engine
        seq = engine.add_request(
            prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), policy
        )
        while not seq.is_finished:
            engine.step()
        return seq.text

    return served.async_engine.call(run)


def test_completion_and_streaming_match_the_engine(served, client):
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    want = _offline(served, prompt, 12)
    got = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.choices[0].text == want and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 12 and got.usage.prompt_tokens == len(prompt)
    stream = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_and_streaming_chat(served, client):
    messages = [{"role": "user", "content": "Say something about foxes."}]
    full = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 10
    assert text == _offline(served, "user: Say something about foxes.\nassistant: ", 10)
    parts = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    assert "".join(p.choices[0].delta.content or "" for p in parts) == text


def test_per_request_policy(served, client):
    prompt = "abcdefghij" * 12
    for policy, keep in (("full", None), ("ada-snapkv", 0.25), ("streamingllm", 0.25)):
        extra = {"ignore_eos": True, "kv_policy": policy, **({"kv_keep": keep} if keep else {})}
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, extra_body=extra)
        want = _offline(served, prompt, 8, served.engine.policy_for(policy, keep, None))
        assert got.choices[0].text == want


def test_kv_prefix_is_compressed_once_and_shared(served, client):
    document = "The vault code is 7291. " + "Filler text about nothing. " * 8
    questions = ["Q: code? A:", "Q: vault? A:"]

    def offline(question: str | list[int], prefix: str | list[int] = document) -> str:
        def run():
            params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
            seq = served.engine.add_request(question, params, prefix=prefix)
            while not seq.is_finished:
                served.engine.step()
            return seq.text

        return served.async_engine.call(run)

    prefixes = served.engine.blocks.prefixes
    hits = prefixes.hits
    for q in questions:
        got = client.completions.create(
            model="tiny", prompt=q, max_tokens=6, temperature=0, extra_body={"ignore_eos": True, "kv_prefix": document}
        )
        assert got.choices[0].text == offline(q)
    assert prefixes.hits - hits == 2 * len(questions) - 1  # only the first request computed the document

    # In a chat request the document opens the conversation as a system message.
    tokenizer = served.engine.tokenizer
    system = [{"role": "system", "content": document}]
    shared = apply_chat_template(tokenizer, system, add_generation_prompt=False)
    hits = prefixes.hits
    for q in questions:
        messages = [{"role": "user", "content": q}]
        got = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True, "kv_prefix": document},
        )
        whole = apply_chat_template(tokenizer, system + messages)
        assert got.usage.prompt_tokens == len(whole)
        assert got.choices[0].message.content == offline(whole[len(shared) :], shared)
    assert prefixes.hits - hits == 2 * len(questions) - 1
    served.async_engine.call(prefixes.clear)
    assert served.pool_whole()


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"prompt": ""}, 400, "empty prompt"),
        ({"prompt": "hi", "kv_policy": "nope"}, 400, "unknown policy"),
        ({"prompt": "hi", "kv_keep": 1.5}, 400, "keep"),
        ({"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
        ({"prompt": "x" * 1100}, 400, "does not fit"),
        ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": [1, 2, 99999]}, 400, "token ids"),
        ({"prompt": "hi", "model": "other"}, 404, "does not exist"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": "hi", "kv_policy": "full", "kv_max_tokens": 64}, 400, "max_kv_tokens"),
        ({"prompt": "hi", "kv_max_tokens": 3}, 400, "max_kv_tokens"),
        ({"prompt": "hi", "kv_max_tokens": 10**30}, 400, "max_kv_tokens"),
        ({"prompt": "hi", "kv_tokens": 10**30}, 400, "token budget"),
        ({"prompt": "hi", "seed": 10**30}, 400, "seed"),
        ({"prompt": "hi", "seed": -1}, 400, "seed"),
        ({"prompt": "hi", "kv_prefix": ""}, 400, "kv_prefix"),
        ({"prompt": "", "kv_prefix": "a document"}, 400, "prompt after it"),
        ({"prompt": "hi", "kv_prefix": "a document", "kv_max_tokens": 64}, 400, "shared prefix"),
    ],
)
def test_bad_requests_get_openai_errors(served, body, status, needle):
    r = httpx.post(served.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"] and err["code"] == status


def test_malformed_json_auth_and_the_server_keeps_serving(served, client):
    r = httpx.post(
        served.url + "/v1/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.post(served.url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert httpx.get(served.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(served.url + "/health").status_code == 200
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.completions.create(model="tiny", prompt="still here", max_tokens=3).choices[0].text is not None


def test_load_with_cancellations_leaves_the_pool_whole(model_dir):
    # A small pool: 64 clients' prompts cannot all be held at once, so some wait or are preempted.
    s = Served(model_dir, kv_memory=3000 * 16 * (2 * 16 * 4 + 4), api_key=None)
    try:
        rng = random.Random(0)
        jobs = [(rng.randint(20, 700), rng.randint(1, 12), rng.random() < 0.25, rng.random() < 0.5) for _ in range(64)]

        async def one(http: httpx.AsyncClient, n: int, max_tokens: int, cancel: bool, stream: bool):
            body = {"prompt": "a" * n, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
            if cancel:
                try:
                    async with asyncio.timeout(0.3):
                        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                            async for _ in r.aiter_lines():
                                pass
                except TimeoutError:
                    return None
                return "finished before cancel"
            if stream:
                text, finish = "", None
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            choice = json.loads(line[6:])["choices"][0]
                            text += choice["text"]
                            finish = choice["finish_reason"] or finish
                return (text, finish)
            r = await http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return (r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"])

        async def main():
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=s.url, timeout=600, limits=limits) as http:
                return await asyncio.gather(*(one(http, *job) for job in jobs))

        results = asyncio.run(main())
        for (n, max_tokens, cancel, _), res in zip(jobs, results, strict=True):
            if cancel:
                continue
            text, finish = res
            assert finish == "length" and len(text.encode()) >= 1, (n, max_tokens, res)
        deadline = time.time() + 60
        while not s.pool_whole():  # cancelled requests are aborted on the engine's next turn
            assert time.time() < deadline, "blocks leaked"
            time.sleep(0.1)
        metrics = httpx.get(s.url + "/metrics").text
        assert (
            "kvsqueeze_kv_blocks_used 0.0" in metrics
            or s.async_engine.call(lambda: s.engine.blocks.blocks_in_use()) == 0
        )
        assert s.async_engine.error is None
    finally:
        s.stop()


@pytest.mark.real_model
def test_serve_answers_the_needle_question_on_the_embedded_model():
    """The demo's question through the openai client: a passphrase hidden in ~2,000 tokens
    of essays, served by SmolLM2-135M under ada-snapkv at keep 0.25."""
    from kvsqueeze.data.haystack import build_haystack
    from kvsqueeze.hf.models import load_model, model_folder

    _, tokenizer = load_model("smollm2-135m")
    haystack = build_haystack(tokenizer, 2000, depth=0.5)
    folder = model_folder("smollm2-135m")
    s = Served(folder, kv_memory="256MiB", api_key=None)
    s.engine.default_policy = make_policy("ada-snapkv", keep=0.25)  # the library's defaults (window 32)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"{haystack.context}\n\n{haystack.question}"}],
            max_tokens=16,
            temperature=0,
        )
        assert haystack.answer in reply.choices[0].message.content, reply.choices[0].message.content
        assert 1800 <= reply.usage.prompt_tokens <= 2300
        assert s.pool_whole()
    finally:
        s.stop()

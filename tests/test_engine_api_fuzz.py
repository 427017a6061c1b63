"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis, bounded): whatever the
body, the server answers without a 500 and stays whole."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from kvsqueeze.engine.async_engine import AsyncLLMEngine
from kvsqueeze.engine.llm_engine import EngineArgs, LLMEngine
from kvsqueeze.engine.server import build_app
from kvsqueeze.hf.tiny import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # 96 positions: no request, however large its numbers, generates for long.
    model = tiny_model("llama", num_layers=2, max_positions=96, seed=1)
    path = tmp_path_factory.mktemp("fuzzed")
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    async_engine = AsyncLLMEngine(LLMEngine(EngineArgs(model=str(path), policy="snapkv", keep=0.5, dtype="fp32")))
    yield async_engine
    async_engine.shutdown()


def test_no_server_errors(engine):
    schema = schemathesis.openapi.from_asgi("/openapi.json", build_app(engine, "tiny"))
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions",
        "POST /v1/chat/completions",
    }
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call()
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)

        check()
    assert 200 in statuses and 400 in statuses  # it generated, and it refused
    assert engine.error is None
    engine.call(engine.engine.blocks.prefixes.clear)  # shared prefixes (kv_prefix) stay cached by design
    assert engine.call(engine.engine.blocks.is_whole)

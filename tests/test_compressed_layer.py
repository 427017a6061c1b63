"""The compressed layer on its own: random tensors, no model, no transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from kvsqueeze.cache import CompressedLayer
from kvsqueeze.ops import dense_causal_attention
from kvsqueeze.policy import ScoreInput, make_policy


def _chunk(b: int, hq: int, hkv: int, t: int, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, t, d, generator=g),
        torch.randn(b, hkv, t, d, generator=g),
        torch.randn(b, hkv, t, d, generator=g),
    )


def test_prefill_then_steps_equal_dense_attention_over_the_kept_entries():
    b, hq, hkv, t, d, steps = 2, 6, 2, 40, 16, 5
    layer = CompressedLayer(make_policy("ada-snapkv", keep=0.3, window=4), layer_idx=0, num_layers=1)
    q, k, v = _chunk(b, hq, hkv, t, d)
    scale = d**-0.5
    prefill_out = layer.forward(q, k, v, None, scale)
    assert torch.allclose(prefill_out, dense_causal_attention(q, k, v, None, scale), atol=1e-5)

    kept = torch.zeros(b, hkv, t, dtype=torch.bool)  # rebuilt from the store: what each head holds
    for row in range(b * hkv):
        kept[row // hkv, row % hkv, layer.store.head(row)[2].long()] = True
    assert torch.equal(kept.sum(-1), layer.kept_after_prefill)
    assert int(layer.physical_tokens().sum()) < b * hkv * t  # it compressed

    keys, values = k.clone(), v.clone()
    for i in range(steps):
        sq, sk, sv = _chunk(b, hq, hkv, 1, d, seed=100 + i)
        out = layer.forward(sq, sk, sv, None, scale)
        keys, values = torch.cat([keys, sk], 2), torch.cat([values, sv], 2)
        visible = torch.cat([kept, torch.ones(b, hkv, i + 1, dtype=torch.bool)], -1)
        mask = visible.repeat_interleave(hq // hkv, dim=1)[:, :, None, :]
        expected = torch.nn.functional.scaled_dot_product_attention(
            sq,
            keys.repeat_interleave(hq // hkv, 1),
            values.repeat_interleave(hq // hkv, 1),
            attn_mask=mask,
            scale=scale,
        )
        assert torch.allclose(out, expected, atol=1e-5)
    assert layer.logical_tokens().tolist() == [t + steps] * b
    assert torch.equal(layer.physical_tokens(), layer.kept_after_prefill + steps)
    assert layer.seen == t + steps


def test_prefill_callback_sees_the_dense_prefill_and_padding_is_never_stored():
    seen: list[tuple[int, ScoreInput]] = []
    layer = CompressedLayer(make_policy("full"), 3, 4, on_prefill=lambda i, x: seen.append((i, x)))
    q, k, v = _chunk(2, 4, 2, 12)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    layer.forward(q, k, v, valid, 0.25)
    assert len(seen) == 1 and seen[0][0] == 3 and seen[0][1].keys is k
    assert layer.physical_tokens().tolist() == [[12, 12], [7, 7]]
    assert layer.logical_tokens().tolist() == [12, 7]
    assert layer.full_nbytes == (12 + 7) * 2 * 2 * 16 * 4


def test_the_layer_runs_without_transformers():
    script = textwrap.dedent(
        """
        import sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ImportError("transformers is blocked in this test")

        sys.meta_path.insert(0, Blocker())
        import torch
        from kvsqueeze.cache import CompressedLayer
        from kvsqueeze.policy import make_policy

        layer = CompressedLayer(make_policy("snapkv", keep=0.25, window=4), 0, 2)
        q, k, v = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
        layer.forward(q, k, v, None, 8**-0.5)
        for _ in range(3):
            out = layer.forward(torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), None, 0.3)
        assert out.shape == (1, 4, 1, 8) and torch.isfinite(out).all()
        assert layer.physical_tokens().tolist() == [[19, 19]], layer.physical_tokens()
        assert "transformers" not in sys.modules
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"

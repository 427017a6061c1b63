"""A decode step decides "is anything padded?" once per forward, not once per layer:
each such check is a host-device sync on a GPU."""

from __future__ import annotations

import torch

from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.tiny import tiny_model
from kvsqueeze.policy import make_policy


def test_padding_is_checked_once_per_decode_step(monkeypatch):
    model = tiny_model("llama", num_layers=4)
    ids = torch.randint(3, 259, (2, 30), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :10] = 0  # left padding: the batch is padded
    cache = KVSqueezeCache(model, make_policy("snapkv", keep=0.5, window=4))
    with cache, torch.no_grad():
        model(ids, attention_mask=am, past_key_values=cache)
        calls = []
        real_all = torch.Tensor.all
        monkeypatch.setattr(torch.Tensor, "all", lambda self, *a, **k: calls.append(1) or real_all(self, *a, **k))
        step = torch.tensor([[5], [6]])
        am = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], dim=-1)
        model(step, attention_mask=am, position_ids=(am.cumsum(-1) - 1)[:, -1:], past_key_values=cache)
    assert len(calls) <= 1  # the mask function's, once; never once per layer

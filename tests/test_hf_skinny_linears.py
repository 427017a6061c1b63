"""hf/skinny_linears.py: a loaded model's linear layers become SkinnyLinear in place,
keep their parameters (tied ones stay tied), and give nn.Linear's products."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvsqueeze.hf.models import load_model
from kvsqueeze.hf.skinny_linears import SkinnyLinear, use_skinny_linears
from kvsqueeze.ops.skinny_linear import SKINNY_MAX_ROWS


def test_every_plain_linear_is_swapped_in_place_and_keeps_its_parameters():
    class Head(nn.Linear):  # a subclass with a forward of its own is left alone
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 16)), Head(16, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inner = model[2][0]
    assert use_skinny_linears(model) is model
    assert type(model[0]) is SkinnyLinear and model[2][0] is inner and type(inner) is SkinnyLinear
    assert type(model[3]) is Head
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_products_equal_nn_linear_for_few_rows_and_many():
    layer = use_skinny_linears(nn.Linear(64, 24))
    for rows in (1, 5, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 3):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 64)  # [batch, tokens, hidden], as a decoder layer hands it
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_a_loaded_model_has_skinny_linears():
    model, _ = load_model("tiny-random-llama")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is SkinnyLinear for m in linears)


def test_a_tied_head_stays_tied():
    embed = nn.Embedding(32, 16)
    head = nn.Linear(16, 32, bias=False)
    head.weight = embed.weight
    model = use_skinny_linears(nn.ModuleDict({"embed": embed, "head": head}))
    assert model["head"].weight is model["embed"].weight


def test_bf16_rows_give_the_fp32_product_rounded_to_bf16():
    layer = use_skinny_linears(nn.Linear(64, 24).bfloat16())
    for rows in (3, SKINNY_MAX_ROWS + 3):
        x = torch.randn(rows, 64).bfloat16()
        out = layer(x)
        expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)

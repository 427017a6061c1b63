"""A transformers model's linear layers on the skinny kernel for a few rows.

Graded answers, perplexity continuations and greedy decoding run the model over 1 to
30 tokens at a time, and each of those forwards reads every weight once: on a 2-core
Zen 3, sgemm reads them at 3-5 GB/s there, and a forward of SmolLM2-135M in fp32
spends 150-240 ms in its linear layers. ops/skinny_linear.py streams them at the
memory's pace. Each layer becomes (in place: the same object, parameters and hooks,
so tied embeddings stay tied and state dicts keep their keys) a subclass that takes the
kernel only for what it accepts (fp32 rows, at most SKINNY_MAX_ROWS of them); prefills
keep nn.Linear's product. On a CPU without bf16 instructions, bf16 rows are multiplied
in fp32 (as the engine's Linear does): oneDNN's emulated bf16 products are 4-9x slower.
"""

from __future__ import annotations

import torch
from torch import nn

from kvsqueeze.ops.skinny_linear import fp32_linear, native_bf16_products


class SkinnyLinear(nn.Linear):
    """nn.Linear whose few-row products take the skinny kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not native_bf16_products():
            return fp32_linear(x.float(), self.weight, self.bias).to(x.dtype)
        if x.dtype == torch.float32:
            return fp32_linear(x, self.weight, self.bias)
        return super().forward(x)


def use_skinny_linears(model: nn.Module) -> nn.Module:
    """Make every nn.Linear of `model` (exactly that class, not subclasses with forwards
    of their own) a SkinnyLinear; returns the model."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SkinnyLinear
    return model

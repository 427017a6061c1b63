"""RULER's variable tracking (Hsieh et al., arXiv 2404.06654): a chain of
assignments "VAR B = VAR A" hidden in repeated filler; the model must name every
variable that ends up holding the first one's value (multi-hop tracing)."""

from __future__ import annotations

import random

from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.tasks.ruler_build import Built
from kvsqueeze.eval.tasks.ruler_vocabulary import number

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HOPS = 4


def build_variable_tracking(rng: random.Random, fmt: PromptFormat, length: int) -> Built:
    names: list[str] = []
    while len(names) < HOPS + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = number(rng, digits=5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)]
    filler_tokens = max(1, len(fmt.tokens(FILLER)))

    def context(n: int) -> str:
        # Statements spread evenly through n fillers, in order, so the chain reads forward.
        slots = [round(i * n / len(chain)) for i in range(len(chain))]
        parts = []
        for i in range(n + 1):
            parts += [s for s, at in zip(chain, slots, strict=True) if at == i]
            if i < n:
                parts.append(FILLER)
        return "Memorize and track the chain of variable assignments hidden in the following text.\n\n" + " ".join(
            parts
        )

    return Built(
        make_context=context,
        most=max(1, length // filler_tokens),
        question=f"Find all variables that are assigned the value {value} in the text above.",
        answer_prefix=f"The variables assigned the value {value} are:",
        answers=tuple(names),
        target=" " + ", ".join(names) + ".",
        max_new_tokens=40,
    )

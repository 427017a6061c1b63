"""kvsqueeze: per-head KV-cache compression with real memory savings.

The library (`make_policy`, `kvsqueeze.hf.KVSqueezeCache`) and the serving engine's
offline API (`LLM`, `SamplingParams`, imported on first use)."""

from kvsqueeze.policy import Budget, Policy, make_policy, policy_names

__all__ = ["LLM", "Budget", "Policy", "SamplingParams", "make_policy", "policy_names"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The engine is imported only when asked for: `import kvsqueeze` stays light.
    if name == "LLM":
        from kvsqueeze.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kvsqueeze.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'kvsqueeze' has no attribute {name!r}")

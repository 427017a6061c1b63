"""The transformers integration: importing it registers the "kvsqueeze" attention."""

from kvsqueeze.hf import attention as _attention  # noqa: F401  (registers the attention by name)
from kvsqueeze.hf.cache import ATTENTION_NAME, KVSqueezeCache, use_kvsqueeze_attention

__all__ = ["ATTENTION_NAME", "KVSqueezeCache", "use_kvsqueeze_attention"]

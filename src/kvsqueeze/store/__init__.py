"""Where kept K/V live. Nothing here knows about models or transformers."""

from kvsqueeze.store.flat_kv import FlatKV

__all__ = ["FlatKV"]

"""Where kept K/V live. Nothing here knows about models or transformers."""

from kvsqueeze.store.base import KVStore
from kvsqueeze.store.block_pool import BlockPool, PoolExhausted
from kvsqueeze.store.flat_kv import FlatKV
from kvsqueeze.store.paged_kv import PagedKV

__all__ = ["BlockPool", "FlatKV", "KVStore", "PagedKV", "PoolExhausted"]

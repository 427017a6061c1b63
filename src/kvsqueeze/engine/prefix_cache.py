"""PrefixCache: compressed prefixes kept for reuse ("compress a document once, ask many
questions").

A request may name its first `prefix_len` prompt tokens as a shared prefix. The
first such request compresses the prefix on its own, question-agnostically (the
policy observes the prefix's last `window` tokens, not the question), and the cache
keeps a fork of every layer's store: the blocks are shared, not copied. A later
request with the same prefix tokens and policy forks those stores instead of
prefilling the prefix, so the prefix is computed once and its blocks are held once;
writes go to private copies (PagedKV's copy-on-write). Entries are dropped least
recently used first when the pool runs short.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from kvsqueeze.store import PagedKV


@dataclass(frozen=True)
class PrefixKey:
    """(policy, prefix token ids), hashed once: the scheduler looks every waiting
    request's key up at every step, and a tuple of thousands of ids rehashes each time."""

    policy: Hashable
    token_ids: tuple[int, ...]
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.policy, self.token_ids)))

    def __hash__(self) -> int:
        return self._hash


class PrefixCache:
    def __init__(self) -> None:
        self.entries: OrderedDict[PrefixKey, list[PagedKV]] = OrderedDict()  # LRU order: oldest first
        self.pending: dict[PrefixKey, int] = {}  # prefix being computed -> the sequence computing it
        self.hits = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: PrefixKey) -> list[PagedKV] | None:
        """The layers of a cached prefix (marked as just used), or None."""
        layers = self.entries.get(key)
        if layers is not None:
            self.entries.move_to_end(key)
        return layers

    def put(self, key: PrefixKey, layers: list[PagedKV]) -> None:
        """Keep forks of a sequence's just-compressed prefix layers."""
        self.pending.pop(key, None)
        if key not in self.entries:
            self.entries[key] = [kv.fork() for kv in layers]

    def drop_oldest(self) -> bool:
        """Forget the least recently used prefix (its blocks go back once no sequence
        holds them). Returns False when the cache is empty."""
        if not self.entries:
            return False
        _, layers = self.entries.popitem(last=False)
        for kv in layers:
            kv.leave(slice(0, kv.num_heads))
        return True

    def clear(self) -> None:
        while self.drop_oldest():
            pass

    def cancel(self, seq_id: int) -> None:
        """A sequence computing a prefix left before finishing it: others may compute it."""
        for key in [k for k, s in self.pending.items() if s == seq_id]:
            del self.pending[key]

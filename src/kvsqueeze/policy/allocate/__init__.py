"""Allocators: how a layer's budget is split over its heads."""

from kvsqueeze.policy.allocate.adakv import AdaKVAllocator
from kvsqueeze.policy.allocate.base import Allocator
from kvsqueeze.policy.allocate.uniform import UniformAllocator

ALLOCATORS: dict[str, type] = {"uniform": UniformAllocator, "ada": AdaKVAllocator}

__all__ = ["ALLOCATORS", "AdaKVAllocator", "Allocator", "UniformAllocator"]

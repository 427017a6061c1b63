"""Allocators: how a layer's budget is split over its heads (cross-layer: over all
layers and heads of a sequence at once)."""

from kvsqueeze.policy.allocate.adakv import AdaKVAllocator
from kvsqueeze.policy.allocate.base import Allocator
from kvsqueeze.policy.allocate.cross_layer import CrossLayerAllocator
from kvsqueeze.policy.allocate.uniform import UniformAllocator

ALLOCATORS: dict[str, type] = {"uniform": UniformAllocator, "ada": AdaKVAllocator, "cross": CrossLayerAllocator}

__all__ = ["ALLOCATORS", "AdaKVAllocator", "Allocator", "CrossLayerAllocator", "UniformAllocator"]

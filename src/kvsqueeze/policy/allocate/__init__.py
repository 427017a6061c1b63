"""Allocators: how a budget is split over heads (within a layer) and over layers."""

from kvsqueeze.policy.allocate.adakv import AdaKVAllocator
from kvsqueeze.policy.allocate.base import Allocator, LayerSchedule
from kvsqueeze.policy.allocate.pyramidkv import FlatSchedule, PyramidSchedule
from kvsqueeze.policy.allocate.uniform import UniformAllocator

__all__ = ["AdaKVAllocator", "Allocator", "LayerSchedule", "FlatSchedule", "PyramidSchedule", "UniformAllocator"]

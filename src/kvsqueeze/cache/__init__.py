"""The compressed layer: policy + store + ops, without transformers. The transformers
adapter (hf/) and the serving engine (engine/) both drive it."""

from kvsqueeze.cache.cross_layer import CrossLayerPrefill
from kvsqueeze.cache.layer import CompressedLayer, LayerMark, PrefillCallback, StoreFactory

__all__ = ["CompressedLayer", "CrossLayerPrefill", "LayerMark", "PrefillCallback", "StoreFactory"]

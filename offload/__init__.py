"""KV state: where past keys and values live and how decode attention reads them."""

from .dense import DenseKV, dense_decode_attention
from .policy import AttnStep, KVPolicy

__all__ = ["AttnStep", "DenseKV", "KVPolicy", "dense_decode_attention"]

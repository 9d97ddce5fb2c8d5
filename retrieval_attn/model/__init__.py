"""Our Llama-family model: spec, layers, forward pass, weight loading, tokenizer."""

from .llama import Llama
from .loader import LoadedModel, embedded_model_path, load_model, random_model
from .spec import NAMED_SHAPES, ModelSpec

__all__ = ["NAMED_SHAPES", "LoadedModel", "Llama", "ModelSpec", "embedded_model_path",
           "load_model", "random_model"]

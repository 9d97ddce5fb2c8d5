"""Our Llama-family model: spec, layers, forward pass, weight loading, tokenizer."""

from retrieval_attn.model.llama import Llama
from retrieval_attn.model.loader import LoadedModel, embedded_model_path, load_model, random_model
from retrieval_attn.model.spec import NAMED_SHAPES, ModelSpec

__all__ = ["NAMED_SHAPES", "LoadedModel", "Llama", "ModelSpec", "embedded_model_path",
           "load_model", "random_model"]

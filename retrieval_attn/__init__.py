"""retrieval-attn: million-token contexts of Llama-family LLMs on one GPU."""

from retrieval_attn.api import LLM, RequestOutput
from retrieval_attn.config import EngineConfig
from retrieval_attn.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

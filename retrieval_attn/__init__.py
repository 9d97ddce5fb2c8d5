"""retrieval-attn: million-token contexts of Llama-family LLMs on one GPU."""

from .api import LLM, RequestOutput
from .config import EngineConfig
from .sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

"""ModelSpec: the architecture numbers of a Llama-family model, and named real shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from retrieval_attn.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope_parameters minus rope_theta
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_attention_heads {self.num_heads} is not a multiple of "
                                 f"num_key_value_heads {self.num_kv_heads}")

    @property
    def kv_bytes_per_token(self) -> int:
        """bf16 K+V bytes one token costs over all layers."""
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * 2

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        """Read a HF config.json dict (transformers 4.x or 5.x layout)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(f"model_type {model_type!r} is not supported; supported "
                                 f"Llama-family types: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(f"rope type {rope_type!r} is not supported; supported: "
                                 f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        rope["rope_type"] = rope_type
        heads = cfg["num_attention_heads"]
        window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else rope,
            max_position_embeddings=cfg.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            sliding_window=window,
            model_type=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


# Real shapes for speed runs with random weights (speed does not depend on weight values).
NAMED_SHAPES: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-3-8b": ModelSpec(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        max_position_embeddings=8192),
    "qwen2.5-7b-1m": ModelSpec(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e7,
        max_position_embeddings=1010000, qkv_bias=True, model_type="qwen2"),
}


def named_shape(name: str) -> ModelSpec:
    if name not in NAMED_SHAPES:
        raise ModelLoadError(f"unknown model shape {name!r}; known shapes: "
                             f"{', '.join(NAMED_SHAPES)}")
    return NAMED_SHAPES[name]

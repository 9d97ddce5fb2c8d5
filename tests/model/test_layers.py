"""Layers and ModelSpec against transformers' own Llama implementation."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from retrieval_attn.errors import ModelLoadError
from retrieval_attn.model.layers import RMSNorm, apply_rope, rope_inv_freq, rope_tables
from retrieval_attn.model.spec import ModelSpec

HEAD_DIM = 128
THETA = 500000.0
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

ROPE_CASES = [
    pytest.param(None, id="default"),
    pytest.param({"rope_type": "linear", "factor": 4.0}, id="linear"),
    pytest.param(LLAMA31_ROPE, id="llama3"),
]


def hf_config(scaling: dict | None) -> transformers.LlamaConfig:
    """A LlamaConfig in the transformers-5 layout: rope_theta inside rope_parameters."""
    rope = {"rope_type": "default"} if scaling is None else dict(scaling)
    rope["rope_theta"] = THETA
    return transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=HEAD_DIM,
                                    max_position_embeddings=131072, rope_parameters=rope)


def hf_inv_freq(scaling: dict | None) -> torch.Tensor:
    cfg = hf_config(scaling)
    kind = cfg.rope_parameters["rope_type"]
    init = (LlamaRotaryEmbedding.compute_default_rope_parameters if kind == "default"
            else ROPE_INIT_FUNCTIONS[kind])
    inv_freq, attention_scaling = init(cfg)
    assert attention_scaling == 1.0
    return inv_freq


# ---------------------------------------------------------------- rotary embedding


def test_hf_config_layout():
    # guards the helper: transformers 5 keeps rope_theta inside rope_parameters
    assert transformers.LlamaConfig().rope_parameters == {"rope_theta": 10000.0,
                                                          "rope_type": "default"}
    assert hf_config(LLAMA31_ROPE).rope_parameters == {**LLAMA31_ROPE, "rope_theta": THETA}


@pytest.mark.parametrize("scaling", ROPE_CASES)
def test_rope_inv_freq_matches_transformers(scaling):
    ours = rope_inv_freq(HEAD_DIM, THETA, scaling)
    theirs = hf_inv_freq(scaling)
    assert ours.dtype == torch.float64
    assert ours.shape == (HEAD_DIM // 2,)
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=0)


def test_llama3_scaling_touches_low_frequencies_only():
    plain = rope_inv_freq(HEAD_DIM, THETA, None)
    scaled = rope_inv_freq(HEAD_DIM, THETA, LLAMA31_ROPE)
    assert torch.equal(scaled[:10], plain[:10])  # high frequencies untouched
    torch.testing.assert_close(scaled[-5:], plain[-5:] / 8.0)  # low ones divided by factor
    mid = (scaled != plain) & ~torch.isclose(scaled, plain / 8.0)
    assert mid.any()  # and some smoothly interpolated in between


def test_unknown_rope_type_in_layers():
    with pytest.raises(ValueError, match="yarn"):
        rope_inv_freq(HEAD_DIM, THETA, {"rope_type": "yarn", "factor": 4.0})


def test_rope_tables_match_transformers_rotary_embedding():
    cfg = hf_config(LLAMA31_ROPE)
    positions = torch.arange(64)
    x = torch.zeros(1, 64, HEAD_DIM)
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(x, positions[None])
    cos, sin = rope_tables(rope_inv_freq(HEAD_DIM, THETA, LLAMA31_ROPE), 64,
                           torch.device("cpu"), torch.float32)
    assert cos.shape == sin.shape == (64, HEAD_DIM)
    # transformers builds the angles in fp32, we in fp64: allow position * eps
    torch.testing.assert_close(cos, hf_cos[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("scaling", ROPE_CASES)
@pytest.mark.parametrize("start", [0, 37])
def test_apply_rope_matches_transformers(scaling, start):
    gen = torch.Generator().manual_seed(0)
    batch, heads, tokens = 2, 4, 9
    q = torch.randn(batch, heads, tokens, HEAD_DIM, generator=gen)
    k = torch.randn(batch, heads, tokens, HEAD_DIM, generator=gen)
    cos, sin = rope_tables(rope_inv_freq(HEAD_DIM, THETA, scaling), 64,
                           torch.device("cpu"), torch.float32)
    cos, sin = cos[start:start + tokens], sin[start:start + tokens]  # [T, D]
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])  # cos as [B=1, T, D]
    ours_q, ours_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    assert (ours_q - hf_q).abs().max() < 1e-6
    assert (ours_k - hf_k).abs().max() < 1e-6
    if start:
        assert (ours_q - q).abs().max() > 0.1  # it did rotate


def test_apply_rope_position_zero_is_identity():
    q = torch.randn(1, 2, 1, HEAD_DIM)
    cos, sin = rope_tables(rope_inv_freq(HEAD_DIM, THETA, None), 4, torch.device("cpu"),
                           torch.float32)
    torch.testing.assert_close(apply_rope(q, cos[:1], sin[:1]), q)


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("dtype, tol", [
    pytest.param(torch.float32, 1e-6, id="fp32"),
    pytest.param(torch.bfloat16, 1e-6, id="bf16"),
])
def test_rmsnorm_matches_transformers(eps, dtype, tol):
    gen = torch.Generator().manual_seed(1)
    dim = 576
    x = (torch.randn(2, 5, dim, generator=gen) * 3).to(dtype)
    weight = torch.randn(dim, generator=gen)
    ours, theirs = RMSNorm(dim, eps), LlamaRMSNorm(dim, eps)
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
        a, b = ours(x), theirs(x)
    assert a.dtype == b.dtype
    assert (a.float() - b.float()).abs().max() < tol
    assert (a.float() - x.float()).abs().max() > 0.1  # it did normalise


# ---------------------------------------------------------------- ModelSpec


BASE_HF = {
    "model_type": "llama", "hidden_act": "silu", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
    "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}


def hf5_dict(scaling: dict | None) -> dict:
    rope = {"rope_type": "default"} if scaling is None else dict(scaling)
    return {**BASE_HF, "rope_parameters": {**rope, "rope_theta": THETA}}


def hf4_dict(scaling: dict | None) -> dict:
    return {**BASE_HF, "rope_theta": THETA,
            "rope_scaling": None if scaling is None else dict(scaling)}


@pytest.mark.parametrize("scaling", ROPE_CASES)
def test_spec_same_from_both_hf_layouts(scaling):
    new, old = ModelSpec.from_hf_config(hf5_dict(scaling)), ModelSpec.from_hf_config(
        hf4_dict(scaling))
    assert new == old
    assert new.rope_theta == THETA
    assert new.rope_scaling == scaling  # rope_theta is not part of rope_scaling
    torch.testing.assert_close(rope_inv_freq(new.head_dim, new.rope_theta, new.rope_scaling),
                               hf_inv_freq(scaling).double(), rtol=1e-6, atol=0)


def test_spec_fields_from_llama31_dict():
    spec = ModelSpec.from_hf_config(hf5_dict(LLAMA31_ROPE))
    assert spec.vocab_size == 128256
    assert spec.hidden_size == 4096
    assert spec.intermediate_size == 14336
    assert spec.num_layers == 32
    assert spec.num_heads == 32
    assert spec.num_kv_heads == 8
    assert spec.head_dim == 128  # derived from hidden_size // heads
    assert spec.max_position_embeddings == 131072
    assert spec.eos_token_ids == (128001, 128008, 128009)
    assert spec.bos_token_id == 128000
    assert spec.qkv_bias is False
    assert spec.sliding_window is None


def test_spec_old_type_key_is_understood():
    # transformers 4 configs may spell rope_type as "type"
    cfg = {**BASE_HF, "rope_theta": THETA, "rope_scaling": {"type": "linear", "factor": 4.0}}
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.rope_scaling["rope_type"] == "linear"
    torch.testing.assert_close(rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling),
                               rope_inv_freq(HEAD_DIM, THETA, None) / 4.0)


def test_spec_defaults_without_rope_keys():
    cfg = {k: v for k, v in BASE_HF.items() if k != "eos_token_id"}
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.rope_theta == 10000.0
    assert spec.rope_scaling is None
    assert spec.eos_token_ids == ()
    assert spec.num_kv_heads == 8


def test_spec_single_eos_and_missing_kv_heads():
    cfg = {**BASE_HF, "eos_token_id": 2}
    del cfg["num_key_value_heads"]
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.eos_token_ids == (2,)
    assert spec.num_kv_heads == spec.num_heads == 32


@pytest.mark.parametrize("use_window, window", [(False, None), (True, 4096)])
def test_spec_qwen2(use_window, window):
    cfg = {**BASE_HF, "model_type": "qwen2", "sliding_window": 4096,
           "use_sliding_window": use_window}
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.qkv_bias is True
    assert spec.sliding_window == window


@pytest.mark.parametrize("change, words", [
    pytest.param({"model_type": "gpt2"}, ["'gpt2'", "llama"], id="gpt2"),
    pytest.param({"hidden_act": "gelu"}, ["'gelu'", "silu"], id="gelu"),
    pytest.param({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": THETA}},
                 ["'yarn'", "llama3"], id="yarn-hf5"),
    pytest.param({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["'yarn'"],
                 id="yarn-hf4"),
    pytest.param({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, ["'dynamic'"],
                 id="dynamic-old-key"),
    pytest.param({"num_key_value_heads": 5}, ["not a multiple"], id="bad-gqa"),
])
def test_spec_rejects_unsupported(change, words):
    with pytest.raises(ModelLoadError) as e:
        ModelSpec.from_hf_config({**BASE_HF, **change})
    for word in words:
        assert word in str(e.value)

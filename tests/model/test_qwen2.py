"""The real Qwen2 Q4_K_M model (q/k/v biases, 7 query heads a kv head) against HF
transformers reading the same GGUF itself: logits at a few hundred tokens, fp32 CPU."""

import pytest
import torch

from retrieval_attn import SamplingParams
from retrieval_attn.model.named import NAMED_MODELS
from retrieval_attn.tools.niah import haystack_text


@pytest.mark.slow
def test_qwen2_gguf_matches_transformers(qwen_llm, tmp_path):
    from transformers import AutoModelForCausalLM

    from retrieval_attn.model.named import named_model_path

    spec = qwen_llm.loaded.spec
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (24, 14, 2, 64)
    assert spec.qkv_bias
    gguf = named_model_path("qwen2.5-coder-0.5b-instruct", qwen_llm.config.model.cache_dir)
    assert gguf.stat().st_size == NAMED_MODELS["qwen2.5-coder-0.5b-instruct"].size
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                              dtype=torch.float32).eval()
    ids = qwen_llm.tokenizer.encode(haystack_text(4000))[:300]
    assert len(ids) == 300
    ours = qwen_llm.engine.runner.prefill(ids, all_logits=True)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 2e-3
    out = qwen_llm.generate({"prompt_token_ids": ids},
                            SamplingParams(max_tokens=24, ignore_eos=True))[0]
    want = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert out.token_ids == want

"""Our forward pass vs HF transformers on the same weights: logits and greedy tokens."""

from pathlib import Path

import pytest
import torch

from retrieval_attn import LLM, SamplingParams
from retrieval_attn.tools.niah import haystack_text

CPU_FP32 = {"runtime": {"device": "cpu", "dtype": "float32", "max_context_tokens": 256,
                        "prefill_chunk_tokens": 7}}  # odd chunk: exercises chunked prefill


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def tiny_checkpoint(kind: str, folder: Path) -> object:
    import transformers

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default",
                                                                  "rope_theta": 1e6})
        model = transformers.Qwen2ForCausalLM(cfg)
    else:  # Llama-3.1 style rope scaling with a short original length so it matters here
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
        cfg = transformers.LlamaConfig(**common, rope_parameters=rope)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # default init leaves biases 0 and norms 1: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.eval().save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_tiny_model_matches_transformers(kind, tmp_path):
    hf = tiny_checkpoint(kind, tmp_path)
    llm = LLM(tmp_path, config=CPU_FP32)
    assert llm.loaded.spec.qkv_bias == (kind == "qwen2")
    ids = torch.randint(0, 300, (100,)).tolist()
    ours = llm.engine.runner.prefill(ids, all_logits=True)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-4
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=40))[0]
    assert out.token_ids == hf_greedy(hf, ids, 40)


@pytest.mark.slow
def test_embedded_model_matches_transformers(cpu_llm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(cpu_llm.loaded.checkpoint_dir,
                                              dtype=torch.float32).eval()
    ids = cpu_llm.tokenizer.encode(haystack_text(8000))[:512]
    assert len(ids) == 512
    ours = cpu_llm.engine.runner.prefill(ids, all_logits=True)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape == (512, 49152)
    assert (ours - ref).abs().max().item() <= 1e-3
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    out = cpu_llm.generate({"prompt_token_ids": ids}, params)[0]
    assert out.token_ids == hf_greedy(hf, ids, 64)

"""KV policies on the embedded model through the public API: one YAML key switches them."""

import pytest

from retrieval_attn import LLM, SamplingParams
from retrieval_attn.tools.niah import haystack_text, run_niah


def cpu_config(**kv):
    return {"runtime": {"device": "cpu", "dtype": "float32", "max_context_tokens": 2304,
                        "prefill_chunk_tokens": 512}, "kv": kv}


@pytest.fixture(scope="module")
def prompt_ids(cpu_llm):
    return cpu_llm.tokenizer.encode(haystack_text(12000))[:1500]


@pytest.mark.parametrize("policy", ["streaming", "quest", "retrieval"])
def test_full_budget_reproduces_dense_tokens(cpu_llm, prompt_ids, policy):
    # with every past token in budget the sparse path is exact: same greedy tokens as dense
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    dense = cpu_llm.generate({"prompt_token_ids": prompt_ids}, params)[0].token_ids
    llm = LLM(config=cpu_config(policy=policy, window_tokens=64, top_k=2304, page_tokens=1))
    assert llm.generate({"prompt_token_ids": prompt_ids}, params)[0].token_ids == dense


def test_policy_from_yaml_file(tmp_path):
    cfg = tmp_path / "retrieval.yaml"
    cfg.write_text("runtime:\n  device: cpu\n  max_context_tokens: 1024\n"
                   "kv:\n  policy: retrieval\n  top_k: 0.05\n  window_tokens: 64\n")
    llm = LLM(config=cfg)
    assert type(llm.engine.kv).__name__ == "SparseKV"
    out = llm.generate([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(max_tokens=12))[0]
    assert "Paris" in out.text
    assert set(llm.engine.kv.memory_bytes()) == {"host"}


@pytest.mark.slow
def test_retrieval_finds_needle_that_streaming_loses():
    # 5% budget: the needle sits far outside the window, only retrieval can reach it
    ret = run_niah(LLM(config=cpu_config(policy="retrieval", top_k=0.05)), 2048, 0.3)
    assert ret.found, ret.answer
    stream = run_niah(LLM(config=cpu_config(policy="streaming", top_k=0.05)), 2048, 0.3)
    assert not stream.found, stream.answer

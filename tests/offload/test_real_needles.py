"""Retrieval must not lose a needle that dense attention finds, on a real long-context
model (Qwen2.5-Coder-0.5B, 32K-trained, q/k/v biases, 7 query heads a kv head): a 4K
NIAH prompt, a 2% budget and a 64-token window, so the needle is found only if the
selection finds it. The prompt is prefilled once; each policy decodes from that KV state.

The tail estimate once turned this model's decode into NaN at the second step (its
scores run in the hundreds: offload/tail.py, kernels/tail_correct/ref.py merge_tail)."""

import random

import pytest

from retrieval_attn import SamplingParams
from retrieval_attn.config import KVConfig
from retrieval_attn.engine import GenerationStats
from retrieval_attn.tools.niah import build_prompt

SMALL = dict(policy="retrieval", window_tokens=64, sink_tokens=4, top_k=0.02)
POLICIES = {
    "tail-estimate": {},
    "no-tail-estimate": {"tail_estimate": False},
    # the long-context presets' lossy settings, together
    "preset-lossy": {"rank": 32, "sketch_dtype": "int4", "host_dtype": "int8",
                     "lookahead_from": 3, "select_block": 4, "rerank_factor": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("depth", [0.5])
def test_retrieval_finds_what_dense_finds(qwen_llm, depth):
    llm, engine = qwen_llm, qwen_llm.engine
    value = str(random.Random(f"needle-{depth}").randint(1_000_000, 9_999_999))
    ids = llm.encode(build_prompt(llm, 4096, depth, value))
    dense = engine.kv
    dense.start_request(len(ids))
    logits = engine.runner.prefill(ids, progress=False)
    k, v = dense.k[:, 0, :, :len(ids)].clone(), dense.v[:, 0, :, :len(ids)].clone()
    params = SamplingParams(max_tokens=10)

    def answer(kv=None) -> str:
        return llm.tokenizer.decode(list(engine.decode(logits, len(ids), params,
                                                       GenerationStats(), kv=kv)))

    assert value in answer(), "dense attention itself misses this needle"
    missed = {}
    for name, extra in POLICIES.items():
        kv = engine.make_policy(KVConfig(**SMALL, **extra), None)
        kv.ingest(k, v, None)
        got = answer(kv)
        if value not in got:
            missed[name] = got
    assert not missed, f"needle {value} lost by {missed}"

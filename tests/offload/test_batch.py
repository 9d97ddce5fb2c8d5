"""Batched decode: B equal-length prompts in lockstep give each prompt's own tokens."""

from __future__ import annotations

import pytest
import torch

from retrieval_attn import LLM, SamplingParams
from retrieval_attn.engine import GenerationStats
from retrieval_attn.errors import ConfigError, RequestError
from retrieval_attn.tools.niah import haystack_text

pytestmark = pytest.mark.slow


def _llm(policy: str, device: str = "cpu", **runtime) -> LLM:
    rt = {"device": device, "max_context_tokens": 700, "max_batch": 3, **runtime}
    return LLM(config={"runtime": rt, "kv": {"policy": policy, "top_k": 0.1,
                                             "window_tokens": 64}})


def _prompts(llm: LLM, n: int = 500) -> list[list[int]]:
    ids = llm.tokenizer.encode(haystack_text(16000))
    return [ids[:n], ids[2000:2000 + n]]


@pytest.mark.parametrize("policy", ["retrieval", "dense", "quest", "streaming"])
def test_batch_decodes_each_prompt_as_alone(policy):
    llm = _llm(policy)
    prompts, params = _prompts(llm), SamplingParams(max_tokens=8)
    stats = [GenerationStats() for _ in prompts]
    together = llm.engine.generate_batch(prompts, params, stats)
    alone = [list(llm.engine.generate_ids(p, params, GenerationStats())) for p in prompts]
    assert together == alone
    assert together[0] != together[1]  # the rows did not leak into each other
    assert [s.generated_tokens for s in stats] == [8, 8]


def test_generate_batches_equal_lengths_and_runs_the_rest_alone():
    llm = _llm("retrieval")
    a, b = _prompts(llm)
    odd = a[:450]
    params = SamplingParams(max_tokens=6)
    prompts = [{"prompt_token_ids": p} for p in (a, odd, b)]
    outs = llm.generate(prompts, params)
    single = LLM(config=llm.config.replace(runtime={"max_batch": 1}))
    assert [o.token_ids for o in outs] == [o.token_ids for o in single.generate(prompts, params)]


def test_batch_errors_say_what_to_change():
    llm = _llm("retrieval")
    a, b = _prompts(llm)
    with pytest.raises(RequestError, match="one length"):
        llm.engine.generate_batch([a, b[:-1]], SamplingParams(), [GenerationStats()] * 2)
    with pytest.raises(RequestError, match="raise runtime.max_batch"):
        llm.engine.generate_batch([a] * 4, SamplingParams(), [GenerationStats()] * 4)
    with pytest.raises(ConfigError, match="index.kind attention serves one sequence"):
        LLM(config=llm.config.replace(index={"kind": "attention"}))
    with pytest.raises(ConfigError, match="max_batch 1"):
        llm.save_context({"prompt_token_ids": a}, "/nonexistent/ctx")


def _decode_logits(llm: LLM, prompts: list[list[int]], feed: list[list[int]]) -> torch.Tensor:
    """Prefill prompts as sequences 0.., feed fixed tokens (not sampled: random weights make
    argmax ties) -> logits [steps, B, V]."""
    engine, n = llm.engine, len(prompts[0])
    for seq, ids in enumerate(prompts):
        engine.kv.start_request(n, seq=seq)
        engine.runner.prefill(ids)
        engine.kv.finish_prefill(n)
    return torch.stack([engine.runner.decode_batch(tokens, n + i)
                        for i, tokens in enumerate(feed)])


# kv.lookahead_from: the side stream's fork (at each layer's lookahead) and join (at the
# next layer's attend) inside a captured CUDA graph, with an int8 host store
LOOKAHEAD = {"policy": "retrieval", "rank": 32, "sketch_dtype": "int8", "rerank_factor": 2,
             "select_block": 4, "lookahead_from": 2, "host_dtype": "int8"}


@pytest.mark.gpu
@pytest.mark.parametrize("kv", [{"policy": "retrieval"}, {"policy": "dense"}, LOOKAHEAD],
                         ids=["retrieval", "dense", "lookahead"])
def test_graphed_batch_equals_eager_and_alone_on_gpu(kv):
    # random weights of the embedded model's shape: no GGUF needed on a GPU machine
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (600,), generator=gen).tolist() for _ in range(3)]
    feed = torch.randint(0, 49152, (4, 3), generator=gen).tolist()  # [steps, B]
    logits = {}
    for graphs in (False, True):
        llm = LLM("random:smollm2-135m", config={
            "runtime": {"device": "cuda", "dtype": "float32", "max_context_tokens": 700,
                        "max_batch": 3, "cuda_graphs": graphs},
            "kv": {"top_k": 0.1, "window_tokens": 64, **kv}})
        logits[graphs] = _decode_logits(llm, prompts, feed)
        # sequence 1 alone (as row 0, the other rows idle) sees what it saw in the batch
        alone = _decode_logits(llm, [prompts[1]], [[t[1]] * 3 for t in feed])
        torch.testing.assert_close(alone[:, 0], logits[graphs][:, 1], atol=2e-3, rtol=1e-3)
        del llm
        torch.cuda.empty_cache()
    torch.testing.assert_close(logits[True], logits[False], atol=2e-3, rtol=1e-3)


def test_seeded_sampling_in_a_batch_equals_alone():
    llm = _llm("retrieval")
    prompts = _prompts(llm)
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=3)
    together = llm.engine.generate_batch(prompts, params, [GenerationStats() for _ in prompts])
    alone = [list(llm.engine.generate_ids(p, params, GenerationStats())) for p in prompts]
    assert together == alone


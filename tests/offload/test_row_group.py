"""kv.select_groups: the kv heads' selection in groups of rows gives the same decode."""

from __future__ import annotations

import pytest
import torch
from test_sparse import L, run_policy  # the same prefill-then-decode driver (L layers)

from retrieval_attn import LLM
from retrieval_attn.config import KVConfig
from retrieval_attn.errors import ConfigError
from retrieval_attn.offload import make_kv_policy
from retrieval_attn.offload.row_group import split_rows

H, D, N = 8, 16, 160


def test_split_rows_is_contiguous_and_even():
    assert split_rows(4, 2) == [slice(0, 2), slice(2, 4)]
    assert split_rows(9, 2) == [slice(0, 5), slice(5, 9)]
    assert split_rows(4, 3) == [slice(0, 2), slice(2, 3), slice(3, 4)]
    assert split_rows(3, 3) == [slice(0, 1), slice(1, 2), slice(2, 3)]


@pytest.mark.parametrize("groups,block", [(2, 1), (3, 4), (4, 4)])
def test_groups_decode_as_one(groups, block):
    """Re-ranked, in runs or one by one, with the tail estimate: every group's rows pick,
    read and attend what the whole step would have, and the tails merge per group."""
    hkv = 4
    q, k, v = (torch.randn(1, h, 120, D) for h in (H, hkv, hkv))
    outs = {}
    for g in (1, groups):
        cfg = KVConfig(policy="retrieval", sink_tokens=2, window_tokens=8, top_k=16, rank=8,
                       rerank_factor=2, select_block=block, sketch_dtype="int8",
                       tail_estimate=True, select_groups=g)
        kv = make_kv_policy(cfg, L, H, hkv, D, N, torch.device("cpu"), torch.float32)
        kv.trace = []
        outs[g] = (run_policy(kv, q, k, v, 100), [t.selected for t in kv.trace])
        assert len(kv._row_groups()) == g
    for a, b in zip(outs[groups][0], outs[1][0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(outs[groups][1], outs[1][1], strict=True):
        assert torch.equal(a.sort(dim=1).values, b.sort(dim=1).values)


def test_select_groups_are_checked():
    with pytest.raises(ConfigError, match="kv.select_groups is 0"):
        KVConfig(policy="retrieval", select_groups=0)
    cfg = KVConfig(policy="retrieval", select_groups=5, rank=4)
    with pytest.raises(ConfigError, match="select_groups is 5 but there are 4 kv-head rows"):
        make_kv_policy(cfg, L, H, 4, D, N, torch.device("cpu"), torch.float32)


@pytest.mark.gpu
def test_graphed_groups_equal_one_group_on_gpu():
    """Streams forked and joined inside a captured CUDA graph: the same logits."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (600,), generator=gen).tolist() for _ in range(3)]
    feed = torch.randint(0, 49152, (4, 3), generator=gen).tolist()  # [steps, B]
    logits = {}
    for groups in (1, 2, 9):
        llm = LLM("random:smollm2-135m", config={
            "runtime": {"device": "cuda", "dtype": "float32", "max_context_tokens": 700,
                        "max_batch": 3, "cuda_graphs": True},
            "kv": {"policy": "retrieval", "top_k": 0.1, "window_tokens": 64, "rank": 32,
                   "sketch_dtype": "int8", "rerank_factor": 2, "select_block": 4,
                   "select_groups": groups}})
        engine, n = llm.engine, len(prompts[0])
        for seq, ids in enumerate(prompts):
            engine.kv.start_request(n, seq=seq)
            engine.runner.prefill(ids)
            engine.kv.finish_prefill(n)
        logits[groups] = torch.stack([engine.runner.decode_batch(tokens, n + i)
                                      for i, tokens in enumerate(feed)])
        del llm, engine
        torch.cuda.empty_cache()
    for groups in (2, 9):
        torch.testing.assert_close(logits[groups], logits[1], atol=2e-3, rtol=1e-3)

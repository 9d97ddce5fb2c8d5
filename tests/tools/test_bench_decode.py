"""bench_decode's setup on the CPU: the configs of its policies, and the synthetic fill of
the ANN path (host graphs built and installed for every layer, then serving decode)."""

from __future__ import annotations

import pytest
import torch

from retrieval_attn import LLM
from retrieval_attn.engine import GenerationStats
from retrieval_attn.errors import RetrievalAttnError
from retrieval_attn.sampling import SamplingParams
from retrieval_attn.tools.bench_decode import bench_config, fill, parse_policy

pytest.importorskip("faiss")


@pytest.mark.parametrize("policy,kv_policy,index,tail", [
    ("retrieval", "retrieval", "lowrank", True),
    ("retrieval-notail", "retrieval", "lowrank", False),
    ("retrieval-ann", "retrieval", "attention", False),
    ("dense", "dense", "lowrank", False),
    ("full-offload", "dense", "lowrank", False)])
def test_bench_policies_map_to_configs(policy, kv_policy, index, tail):
    cfg = bench_config("qwen2.5-7b-1m", policy, 131072, 16, 2048, 32)
    assert (cfg.kv.policy, cfg.index.kind, cfg.kv.tail_estimate) == (kv_policy, index, tail)
    assert cfg.index.builder == "inline"  # the GPU machine has no Ray


def test_policy_overrides_set_the_sketch():
    cfg = bench_config("qwen2.5-7b-1m", "retrieval:sketch=int4,rank=128,rerank=2", 131072, 16,
                       2048, 32)
    assert (cfg.kv.sketch_dtype, cfg.kv.rank, cfg.kv.rerank_factor) == ("int4", 128, 2)
    assert cfg.kv.tail_estimate
    cfg = bench_config("qwen2.5-7b-1m", "retrieval-notail:sketch=int8", 131072, 16, 2048, 64)
    assert (cfg.kv.sketch_dtype, cfg.kv.rank, cfg.kv.tail_estimate) == ("int8", 64, False)
    cfg = bench_config("qwen2.5-7b-1m", "retrieval:block=4,topk=4096,rerank=1", 131072, 16,
                       2048, 64)
    assert (cfg.kv.select_block, cfg.kv.top_k, cfg.kv.rerank_factor) == (4, 4096, 1)
    cfg = bench_config("qwen2.5-7b-1m", "retrieval:passes=2", 131072, 16, 2048, 64)
    assert cfg.kv.score_passes == 2
    assert parse_policy("retrieval:ahead=3,store=device,sms=0.75")[1] == {
        "lookahead_from": 3, "store_on": "device", "lookahead_sm_share": 0.75}
    assert parse_policy("dense") == ("dense", {})
    for bad in ("dense:rank=8", "retrieval:colour=red", "retrieval:rank="):
        with pytest.raises(RetrievalAttnError, match="overrides"):
            parse_policy(bad)


def test_ann_fill_installs_every_layer_and_serves_decode():
    n = 700
    cfg = bench_config("smollm2-135m", "retrieval-ann", n, 4, 64, 16).replace(
        runtime={"device": "cpu", "dtype": "float32", "cuda_graphs": False},
        index={"build_queries": 64})
    llm = LLM(config=cfg)
    torch.manual_seed(0)
    fill(llm, n)
    kv = llm.engine.kv
    assert sorted(kv.ann.layers) == list(range(llm.loaded.spec.num_layers))
    assert all(ix.lo == cfg.kv.sink_tokens for ix in kv.ann.layers.values())
    logits = torch.zeros(llm.loaded.spec.vocab_size)
    list(llm.engine.decode(logits, n, SamplingParams(max_tokens=3, ignore_eos=True),
                           GenerationStats()))
    assert kv.ann.served["lowrank"] == 0 and kv.ann.served["index"] > 0

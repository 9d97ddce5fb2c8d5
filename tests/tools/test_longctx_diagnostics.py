"""rank_recall: recall of the true top-k by sketch rank and re-rank factor."""

from __future__ import annotations

import torch

from retrieval_attn.config import KVConfig
from retrieval_attn.offload.make import make_kv_policy
from retrieval_attn.offload.policy import AttnStep
from retrieval_attn.tools.longctx_diagnostics import rank_recall

L, H, HKV, D, N, PROMPT = 2, 4, 2, 16, 256, 200


def _first_step():
    """A retrieval policy with a float sketch (rank_recall sketches in the config's
    precision) after a PROMPT-token prefill and one traced decode step."""
    cfg = KVConfig(policy="retrieval", sink_tokens=2, window_tokens=16, top_k=20, rank=4,
                   sketch_dtype="auto", rerank_factor=2, tail_estimate=False)
    kv = make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    q, k, v = (torch.randn(1, h, PROMPT + 1, D) for h in (H, HKV, HKV))
    kv.start_request()
    for layer in range(L):
        kv.attend(layer, q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT],
                  AttnStep(torch.arange(PROMPT), 0))
        kv.finish_layer(layer, PROMPT)
    kv.finish_prefill(PROMPT)
    kv.trace = []
    step = AttnStep(torch.tensor([PROMPT]), PROMPT)
    for layer in range(L):
        kv.attend(layer, q[:, :, PROMPT:], k[:, :, PROMPT:], v[:, :, PROMPT:], step)
    return kv.trace, kv, cfg


def test_full_rank_is_exact_and_more_candidates_beat_a_poor_sketch():
    entries, kv, cfg = _first_step()
    out = rank_recall(entries, kv, cfg, ranks=(2, 16), factors=(2, 16))
    rows = {r["rank"]: r for r in out["rows"]}
    # full rank (16 = head_dim): the sketch is exact, with or without re-ranking
    assert rows[16]["plain"] == rows[16]["x2"] == rows[16]["x16"] == 1.0
    # rank 2: top_k 20 × 16 candidates cover the whole region and are scored exactly, yet
    # weighted by each head's sketched normaliser (window + region as sketched), so the
    # recall is high but need not be 1
    assert rows[2]["plain"] < rows[2]["x16"] and rows[2]["x16"] >= 0.9
    assert "rerank x2" in out["lines"][0] and len(out["lines"]) == 3


def test_an_int8_store_is_measured_against_the_exact_prompt_rows():
    """With every token attended, the output differs from dense only by the int8 store's
    rounding: the store's own rows as the reference hide it, the prompt's exact rows show
    it; a float32 store is exact either way."""
    from retrieval_attn.tools.longctx_diagnostics import layer_diagnostics

    q, k, v = (torch.randn(1, h, PROMPT + 1, D) for h in (H, HKV, HKV))
    errors = {}
    for host in ("auto", "int8"):
        cfg = KVConfig(policy="retrieval", sink_tokens=2, window_tokens=16, top_k=N, rank=4,
                       rerank_factor=2, tail_estimate=False, host_dtype=host)
        kv = make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
        kv.ingest(k[0, :, :PROMPT][None].expand(L, -1, -1, -1).contiguous(),
                  v[0, :, :PROMPT][None].expand(L, -1, -1, -1).contiguous())
        kv.trace = []
        step = AttnStep(torch.tensor([PROMPT]), PROMPT)
        for layer in range(L):
            kv.attend(layer, q[:, :, PROMPT:], k[:, :, PROMPT:], v[:, :, PROMPT:], step)
        exact = tuple(x[0, :, :PROMPT][None].expand(L, -1, -1, -1) for x in (k, v))
        errors[host] = [layer_diagnostics(kv.trace, kv, cfg, e)["mean"]["rel_err"]
                        for e in (None, exact)]
    assert max(errors["auto"]) < 1e-5
    assert errors["int8"][1] > 1e-3 and errors["int8"][1] > 3 * errors["int8"][0]

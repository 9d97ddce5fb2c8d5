"""The decode-step micro-benchmarks run and report every part (GPU: pinned host reads)."""

from __future__ import annotations

import pytest

from retrieval_attn.tools.bench_step_parts import bench_gathers, bench_topk


@pytest.mark.gpu
def test_gathers_and_topk_report_every_part():
    row = bench_gathers("smollm2-135m", 65536, 512, 128, reps=1)
    assert set(row) == {"context", "K of candidates", "K+V of final", "V of final",
                        "K of candidates then V of final", "the same, candidates in runs of 4",
                        "K of candidates, one launch", "runs of 4, one launch each"}
    assert all(v > 0 for k, v in row.items() if k != "context")
    top = bench_topk("smollm2-135m", 65536, 512, 4, reps=1)
    assert set(top) == {"context", "torch.topk", "ours", "ours same set"}
    assert top["torch.topk"] > 0 and top["ours"] > 0 and 0.9 <= top["ours same set"] <= 1


@pytest.mark.gpu
def test_score_variants_compute_the_built_launchs_block_sums():
    from retrieval_attn.tools.bench_step_parts import SCORE_VARIANTS, bench_scores

    rows = bench_scores("smollm2-135m", 65536, 32, "int8", 4, reps=1)
    assert [r["variant"] for r in rows if r["passes"] == 1] == list(SCORE_VARIANTS)
    assert [r["passes"] for r in rows].count(2) == 1
    assert all(r["us"] > 0 and r["max diff"] < 1e-4 for r in rows)


@pytest.mark.gpu
def test_tail_variants_compute_the_built_launchs_output():
    from retrieval_attn.tools.bench_step_parts import TAIL_VARIANTS, bench_tail

    rows = bench_tail("smollm2-135m", 65536, 512, reps=1)
    assert [r["variant"] for r in rows] == list(TAIL_VARIANTS)
    assert all(r["us"] > 0 and r["max diff"] < 1e-3 for r in rows)

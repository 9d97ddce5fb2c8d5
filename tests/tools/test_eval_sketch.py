"""eval_sketch on a small synthetic capture: recall that is exact at full rank, grows with
the re-rank factor, and barely moves when the same sketch is stored in int8."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval_attn.tools.eval_sketch import layer_recall, main


def _capture(tmp_path, n=700, hkv=2, g=3, d=16, steps=6):
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(hkv, n, d, generator=gen) * torch.linspace(2, 0.2, d)
    q = torch.randn(hkv * g, steps, d, generator=gen) * 2
    folder = tmp_path / f"n{n}"
    folder.mkdir()
    np.savez(folder / "layer0.npz", k=k.half().numpy(), q_decode=q.half().numpy(),
             q_prefill=q.half().numpy())
    (folder / "meta.json").write_text(json.dumps({"tokens": n, "layers": [0]}))
    return k.half().float(), q.half().float()


def test_recall_is_exact_at_full_rank_and_grows_with_reranking(tmp_path):
    k, q = _capture(tmp_path)
    args = dict(budget=20, sinks=4, window=64)
    assert layer_recall(k, q, 16, "float32", 1, **args) == 1.0  # rank = head_dim: exact
    low = [layer_recall(k, q, 2, "float32", f, **args) for f in (1, 4, 16)]
    assert low[0] < low[1] < low[2] and low[0] < 0.9


@pytest.mark.parametrize("sketch, at_least", [("int8", 0.95), ("int4", 0.8)])
def test_quantised_sketch_keeps_most_of_the_float_recall(tmp_path, sketch, at_least):
    """Full rank, so only the rounding differs from float32's exact recall of 1."""
    k, q = _capture(tmp_path)
    args = dict(budget=20, sinks=4, window=64)
    alone = layer_recall(k, q, 16, sketch, 1, **args)
    assert at_least <= alone < 1.0
    assert layer_recall(k, q, 16, sketch, 4, **args) > alone  # exact re-rank mends some


def test_cli_prints_a_row_per_rank_precision_and_factor(tmp_path, capsys):
    _capture(tmp_path)
    out = tmp_path / "rows.json"
    assert main(["--qk", str(tmp_path), "--tokens", "700", "--budget", "20", "--window",
                 "64", "--ranks", "4", "--factors", "1", "2", "--stride", "2", "--json",
                 str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["sketch"], r["rerank"]) for r in rows] == [
        ("float32", 1), ("float32", 2), ("int8", 1), ("int8", 2), ("int4", 1), ("int4", 2)]
    assert "recall of the true top-20" in capsys.readouterr().out

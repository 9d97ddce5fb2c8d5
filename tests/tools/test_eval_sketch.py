"""eval_sketch on a small synthetic capture: the int8 round trip, and recall that is exact
at full rank and grows with the re-rank factor."""

from __future__ import annotations

import json

import numpy as np
import torch

from retrieval_attn.tools.eval_sketch import layer_recall, main, quantise_int8


def test_int8_round_trip_is_within_half_a_step():
    keys = torch.randn(2, 300, 8) * torch.tensor([1.0, 5.0, 0.1, 2, 2, 2, 2, 2])
    back = quantise_int8(keys)
    step = keys.abs().amax(dim=1, keepdim=True) / 127
    assert ((back - keys).abs() <= step / 2 + 1e-6).all()
    assert not torch.equal(back, keys)


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
    assert layer_recall(k, q, 16, False, 1, **args) == 1.0  # rank = head_dim: exact
    low = [layer_recall(k, q, 2, False, f, **args) for f in (1, 4, 16)]
    assert low[0] < low[1] < low[2] and low[0] < 0.9


def test_cli_prints_a_row_per_rank_precision_and_factor(tmp_path, capsys):
    _capture(tmp_path)
    out = tmp_path / "rows.json"
    assert main(["--qk", str(tmp_path), "--tokens", "700", "--budget", "20", "--window",
                 "64", "--ranks", "4", "--factors", "1", "2", "--stride", "2", "--json",
                 str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["sketch"], r["rerank"]) for r in rows] == [
        ("float32", 1), ("float32", 2), ("int8", 1), ("int8", 2)]
    assert "recall of the true top-20" in capsys.readouterr().out

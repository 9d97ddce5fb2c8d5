"""retrieval-attn eval: dense, retrieval and retrieval with a host index in one table."""

from __future__ import annotations

import json

import pytest

from retrieval_attn.config import KVConfig
from retrieval_attn.tools.eval_longctx import main, policy_grid

pytest.importorskip("faiss")


def test_policy_grid_names_every_row():
    grid = policy_grid(KVConfig(), [0.05, 0.02], ["retrieval", "quest"], ["attention"])
    names = [name for name, _, _ in grid]
    assert names == ["dense", "retrieval@0.05", "retrieval+attention@0.05", "quest@0.05",
                     "retrieval@0.02", "retrieval+attention@0.02", "quest@0.02"]
    index = dict((n, i) for n, _, i in grid)
    assert index["retrieval+attention@0.02"].kind == "attention"
    assert index["retrieval@0.02"] is None


@pytest.mark.slow
def test_eval_runs_an_index_policy_beside_dense(tmp_path, capsys):
    assert main(["--config", "cpu-small", "--lengths", "700", "--depths", "0.5",
                 "--per-task", "1", "--budgets", "0.1", "--policies", "retrieval",
                 "--indexes", "attention", "--max-tokens", "6", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("accuracy (%)"):]
    for name in ("dense", "retrieval@0.1", "retrieval+attention@0.1"):
        assert f"\n{name} " in table
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 5 * 3  # five tasks, three policies
    diagnostics = json.loads((tmp_path / "results.json").read_text())["diagnostics"]
    assert "retrieval+attention@0.1" in diagnostics

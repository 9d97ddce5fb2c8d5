"""retrieval-attn save-context + inspect on the embedded model: a table and a PNG."""

from __future__ import annotations

import pytest

from retrieval_attn.tools.cli import main

pytest.importorskip("faiss")
pytest.importorskip("hnswlib")

CONFIG = """
runtime: {device: cpu, dtype: float32, max_context_tokens: 2048, prefill_chunk_tokens: 512,
          progress_bar: false}
kv: {policy: retrieval, top_k: 0.1, window_tokens: 128}
index: {kind: attention, builder: inline, build_queries: 256}
"""


@pytest.mark.slow
def test_save_context_then_inspect(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    ctx = tmp_path / "ctx"
    assert main(["save-context", str(ctx), "--niah", "900", "--config", str(cfg)]) == 0
    assert (ctx / "manifest.json").is_file()
    capsys.readouterr()
    assert main(["inspect", str(ctx), "--layers", "5", "--k", "20",
                 "--plot", str(tmp_path / "curves.png")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert {"faiss-hnsw", "faiss-ivf", "hnswlib", "attention-aware"} <= set(rows)
    assert float(rows["attention-aware"][3]) >= 0.9  # best mean recall@20 of the saved index
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_inspect_refuses_a_folder_without_a_context(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a saved context" in capsys.readouterr().err

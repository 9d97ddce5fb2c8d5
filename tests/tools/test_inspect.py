"""retrieval-attn save-context + inspect on the embedded model: a table and a PNG."""

from __future__ import annotations

import sys

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


# ---------------------------------------------------------------- issue 27: bad inputs


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """A small saved context with attention-aware indexes (300 prompt tokens)."""
    from retrieval_attn import LLM, EngineConfig
    from retrieval_attn.tools.niah import build_prompt

    folder = tmp_path_factory.mktemp("inspect")
    (folder / "cfg.yaml").write_text(CONFIG)
    llm = LLM(config=EngineConfig.load(folder / "cfg.yaml"))
    return llm.save_context(build_prompt(llm, 300, 0.5, "7305519"), folder / "ctx")


def error_of(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_layer_the_model_has_not(ctx, capsys):
    err = error_of(capsys, ["inspect", str(ctx), "--layers", "99"])
    assert "--layers 99: the model of" in err and "has 30 layers; give layers 0 to 29" in err


@pytest.mark.parametrize("k", ["0", "100000"])
def test_k_outside_the_indexed_keys(ctx, capsys, k):
    err = error_of(capsys, ["inspect", str(ctx), "--layers", "5", "--k", k])
    assert f"--k is {k}, but each head" in err and "give --k 1 to" in err


def test_target_outside_0_1(ctx, capsys):
    assert "--target is 2.0" in error_of(capsys, ["inspect", str(ctx), "--target", "2"])


def test_without_faiss(ctx, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    err = error_of(capsys, ["inspect", str(ctx), "--layers", "5"])
    assert "inspect needs faiss" in err and "pip install faiss-cpu" in err


def test_manifest_that_is_not_an_object(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("[1, 2, 3]")
    assert "holds a JSON list, not an object" in error_of(capsys, ["inspect", str(tmp_path)])


def test_table_says_what_the_share_counts(ctx, capsys, tmp_path):
    assert main(["inspect", str(ctx), "--layers", "5", "--k", "20",
                 "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "distances computed per query" in out and "over 100% is more work" in out

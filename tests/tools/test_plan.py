"""retrieval-attn plan through the CLI: impossible flags and paths are one error line,
exit 2, before any model is read; a .gguf is planned from its header (issue 27)."""

from __future__ import annotations

import pytest

from retrieval_attn.model.loader import embedded_model_path
from retrieval_attn.tools.cli import main

SEARCH = ["plan", "--model", "smollm2-135m", "--context", "4096", "--gpu-mem", "8GiB",
          "--host-mem", "16GiB"]


def error_of(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_write_into_a_missing_folder(capsys, tmp_path):
    err = error_of(capsys, SEARCH + ["--write", str(tmp_path / "no" / "dir" / "x.yaml")])
    assert "the folder" in err and "does not exist" in err
    err = error_of(capsys, SEARCH + ["--write", str(tmp_path)])
    assert "is a folder: give a YAML file path" in err


@pytest.mark.parametrize("flag", ["--chunk", "--max-rank", "--top-k", "--batch"])
def test_zero_is_refused(capsys, flag):
    err = error_of(capsys, SEARCH + [flag, "0"])
    assert f"{flag} is 0: it must be a positive number" in err


def test_small_chunk_is_planned_as_given(capsys):
    """--chunk below the smallest searched chunk (128) plans that chunk, not 128"""
    assert main(SEARCH + ["--chunk", "100"]) == 0
    assert "prefill_chunk_tokens: 100" in capsys.readouterr().out


def test_lookahead_past_the_last_layer(capsys, tmp_path):
    err = error_of(capsys, SEARCH + ["--lookahead-from", "1000"])
    assert "kv.lookahead_from is 1000 but random:smollm2-135m has 30 layers" in err
    cfg = tmp_path / "ahead.yaml"
    cfg.write_text("model: {path: 'random:smollm2-135m'}\nruntime: {device: cpu}\n"
                   "kv: {policy: retrieval, lookahead_from: 30}\n")
    err = error_of(capsys, ["plan", "--config", str(cfg), "--host-mem", "16GiB"])
    assert "kv.lookahead_from is 30" in err and "use 1 to 29" in err


def test_gguf_is_planned_from_its_header(capsys, tmp_path, monkeypatch):
    """no weights are read: nothing is exported into the (fresh) cache"""
    monkeypatch.setenv("HOME", str(tmp_path))
    model = tmp_path / "mine.gguf"
    model.symlink_to(embedded_model_path())
    assert main(["plan", "--model", str(model), "--context", "4096", "--gpu-mem", "8GiB",
                 "--host-mem", "16GiB"]) == 0
    assert "policy: dense" in capsys.readouterr().out
    assert not (tmp_path / ".cache").exists()

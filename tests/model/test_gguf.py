"""A GGUF's model shape from its header alone: what the export gives, with no weights read."""

from __future__ import annotations

import pytest

from retrieval_attn.errors import ModelLoadError
from retrieval_attn.model.gguf import read_gguf_header, read_gguf_spec
from retrieval_attn.model.loader import checkpoint_dir, embedded_model_path, read_spec
from retrieval_attn.planner import spec_for


def test_header_spec_is_the_exported_spec():
    exported = read_spec(checkpoint_dir(None, "~/.cache/retrieval-attn"))  # exports once
    assert read_gguf_spec(embedded_model_path()) == exported


def test_spec_for_a_gguf_exports_nothing(tmp_path):
    model = tmp_path / "mine.gguf"
    model.symlink_to(embedded_model_path())
    spec = spec_for(str(model), cache_dir=str(tmp_path / "cache"))
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads) == (30, 9, 3)
    assert not (tmp_path / "cache").exists()


def test_header_reads_tensor_shapes_and_array_lengths():
    meta, shapes = read_gguf_header(embedded_model_path())
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == 49152  # an array: its length
    assert shapes["token_embd.weight"] == [576, 49152]  # ggml order: [C, V]


@pytest.mark.parametrize("size", [3, 100, 20_000])
def test_cut_header_is_refused(tmp_path, size):
    f = tmp_path / "cut.gguf"
    with embedded_model_path().open("rb") as src:
        f.write_bytes(src.read(size))
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        read_gguf_spec(f)

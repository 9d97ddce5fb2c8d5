"""EngineConfig: presets, YAML loading, and the errors a user sees for a bad config."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from retrieval_attn.config import (
    DEVICES,
    DTYPES,
    KV_POLICIES,
    EngineConfig,
    KVConfig,
    ModelConfig,
    RuntimeConfig,
    _build,
    _check_type,
    preset_names,
    resolve_for_shape,
)
from retrieval_attn.errors import ConfigError
from retrieval_attn.model.spec import NAMED_SHAPES


def write_yaml(tmp_path, text: str, name: str = "engine.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- presets


def test_preset_names_include_shipped_presets():
    names = preset_names()
    assert "default" in names
    assert "cpu-small" in names


def test_default_preset_matches_dataclass_defaults():
    # default.yaml documents every key with its default value: the two must agree.
    assert EngineConfig.load("default") == EngineConfig()


def test_cpu_small_preset_values():
    cfg = EngineConfig.load("cpu-small")
    assert cfg.runtime.device == "cpu"
    assert cfg.runtime.dtype == "float32"
    assert cfg.runtime.max_context_tokens == 4608
    assert cfg.runtime.prefill_chunk_tokens == 512
    assert cfg.runtime.cuda_graphs is False
    assert cfg.kv.policy == "dense"
    assert cfg.model.path is None
    # keys the preset leaves out keep their defaults
    assert cfg.model.cache_dir == ModelConfig().cache_dir
    assert cfg.runtime.progress_bar_min_tokens == RuntimeConfig().progress_bar_min_tokens


@pytest.mark.parametrize("given", [
    pytest.param(None, id="none"),
    pytest.param({}, id="empty-dict"),
])
def test_load_empty_gives_defaults(given):
    assert EngineConfig.load(given) == EngineConfig()


def test_load_passes_config_through():
    cfg = EngineConfig(runtime=RuntimeConfig(device="cpu"))
    assert EngineConfig.load(cfg) is cfg


def test_load_dict():
    cfg = EngineConfig.load({"runtime": {"max_context_tokens": 100}, "kv": {"policy": "dense"}})
    assert cfg.runtime.max_context_tokens == 100
    assert cfg.runtime.device == "auto"


# ---------------------------------------------------------------- YAML files


@pytest.mark.parametrize("as_str", [pytest.param(False, id="path"), pytest.param(True, id="str")])
def test_yaml_round_trip(tmp_path, as_str):
    cfg = EngineConfig(
        model=ModelConfig(path="/models/llama", cache_dir="/tmp/cache"),
        runtime=RuntimeConfig(device="cuda:1", dtype="float16", max_context_tokens=65536,
                              prefill_chunk_tokens=256, cuda_graphs=False, progress_bar=False,
                              progress_bar_min_tokens=0),
        kv=KVConfig(policy="dense"),
    )
    path = write_yaml(tmp_path, yaml.safe_dump(dataclasses.asdict(cfg)))
    loaded = EngineConfig.load(str(path) if as_str else path)
    assert loaded == cfg
    assert loaded != EngineConfig()


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = write_yaml(tmp_path, "# nothing set\n")
    assert EngineConfig.from_yaml(path) == EngineConfig()


def test_missing_yaml_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        EngineConfig.load(missing)
    msg = str(e.value)
    assert "nope.yaml" in msg
    assert "does not exist" in msg
    for name in preset_names():  # tells the user which presets exist
        assert name in msg


def test_unknown_preset_name_is_reported_as_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        EngineConfig.load("no-such-preset")


def test_config_path_that_is_a_directory(tmp_path):
    """said "does not exist" of a folder that exists (issue 27)"""
    with pytest.raises(ConfigError, match="is a directory: pass a YAML file"):
        EngineConfig.load(tmp_path)


@pytest.mark.parametrize("config", [["kv"], 3, ("default",)], ids=["list", "int", "tuple"])
def test_config_of_another_type_is_refused(config):
    """LLM(config=["kv"]) said "config file ['kv'] does not exist" (issue 27)"""
    with pytest.raises(ConfigError, match=f"config is a {type(config).__name__} .*preset name"):
        EngineConfig.load(config)


def test_invalid_yaml(tmp_path):
    path = write_yaml(tmp_path, "runtime:\n  device: [cpu\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        EngineConfig.from_yaml(path)


@pytest.mark.parametrize("text, kind", [
    pytest.param("- runtime\n- kv\n", "list", id="list"),
    pytest.param("just a string\n", "str", id="scalar"),
])
def test_yaml_top_level_must_be_mapping(tmp_path, text, kind):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_yaml(path)
    assert "mapping" in str(e.value)
    assert kind in str(e.value)


def test_error_names_the_yaml_file(tmp_path):
    path = write_yaml(tmp_path, "runtime:\n  dtype: int8\n", name="mine.yaml")
    with pytest.raises(ConfigError, match="mine.yaml"):
        EngineConfig.from_yaml(path)


# ---------------------------------------------------------------- unknown keys


def test_unknown_top_level_key():
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_dict({"runtme": {"device": "cpu"}})
    msg = str(e.value)
    assert "'runtme'" in msg
    assert "top level" in msg
    assert "valid keys are: model, runtime, kv" in msg


@pytest.mark.parametrize("section, key, valid", [
    pytest.param("runtime", "max_context", [f.name for f in dataclasses.fields(RuntimeConfig)],
                 id="runtime"),
    pytest.param("model", "weights", [f.name for f in dataclasses.fields(ModelConfig)],
                 id="model"),
    pytest.param("kv", "budget", [f.name for f in dataclasses.fields(KVConfig)], id="kv"),
])
def test_unknown_key_in_section(tmp_path, section, key, valid):
    path = write_yaml(tmp_path, yaml.safe_dump({section: {key: 1}}))
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_yaml(path)
    msg = str(e.value)
    assert repr(key) in msg
    assert f"section {section!r}" in msg
    assert "valid keys are: " + ", ".join(valid) in msg


def test_section_must_be_mapping():
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_dict({"runtime": "cpu"})
    msg = str(e.value)
    assert "runtime must be a mapping" in msg
    assert "max_context_tokens" in msg  # lists the keys the section takes


# ---------------------------------------------------------------- wrong types


@pytest.mark.parametrize("section, key, value, must_be", [
    pytest.param("runtime", "max_context_tokens", "big", "int", id="str-for-int"),
    pytest.param("runtime", "max_context_tokens", True, "int", id="bool-for-int"),
    pytest.param("runtime", "prefill_chunk_tokens", 512.0, "int", id="float-for-int"),
    pytest.param("runtime", "progress_bar_min_tokens", None, "int", id="null-for-int"),
    pytest.param("runtime", "cuda_graphs", 3, "bool", id="int-for-bool"),
    pytest.param("runtime", "progress_bar", "yes please", "bool", id="str-for-bool"),
    pytest.param("runtime", "device", 0, "str", id="int-for-str"),
    pytest.param("model", "path", 3, "str or null", id="int-for-optional-str"),
    pytest.param("model", "cache_dir", None, "str", id="null-for-str"),
    pytest.param("kv", "policy", ["dense"], "str", id="list-for-str"),
])
def test_wrong_type(section, key, value, must_be):
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_dict({section: {key: value}})
    msg = str(e.value)
    assert f"{section}.{key}" in msg
    assert f"it must be {must_be}" in msg
    assert type(value).__name__ in msg


def test_model_path_null_is_allowed():
    assert EngineConfig.from_dict({"model": {"path": None}}).model.path is None


def test_check_type_accepts_int_for_float():
    # No config field is a float today; the type check still promises int -> float.
    out = _check_type(3, float, "x.y", "test")
    assert out == 3.0 and type(out) is float
    assert _check_type(None, float | None, "x.y", "test") is None
    with pytest.raises(ConfigError, match="it must be float"):
        _check_type(True, float, "x.y", "test")
    with pytest.raises(ConfigError, match="it must be float"):
        _check_type("1.5", float, "x.y", "test")


@dataclasses.dataclass(frozen=True)
class _WithFloat:
    ratio: float = 0.5


def test_build_accepts_int_for_float_field():
    # The loader path (_build) that every section goes through converts ints for float fields.
    out = _build(_WithFloat, {"ratio": 2}, section="demo", source="test")
    assert out.ratio == 2.0 and type(out.ratio) is float
    with pytest.raises(ConfigError, match="demo.ratio"):
        _build(_WithFloat, {"ratio": False}, section="demo", source="test")


# ---------------------------------------------------------------- impossible values


@pytest.mark.parametrize("section, key, value, expect", [
    pytest.param("runtime", "max_context_tokens", 1, ["max_context_tokens is 1", "at least 2"],
                 id="context-1"),
    pytest.param("runtime", "max_context_tokens", -5, ["at least 2"], id="context-negative"),
    pytest.param("runtime", "prefill_chunk_tokens", 0, ["prefill_chunk_tokens is 0", "positive"],
                 id="chunk-0"),
    pytest.param("runtime", "progress_bar_min_tokens", -1, [">= 0"], id="bar-min-negative"),
    pytest.param("runtime", "device", "tpu", ["'tpu'", *DEVICES, "cuda:N"], id="device-tpu"),
    pytest.param("runtime", "device", "cuda:x", ["'cuda:x'", "cuda:N"], id="device-cuda-x"),
    pytest.param("runtime", "device", "cuda:", ["'cuda:'"], id="device-cuda-colon"),
    pytest.param("runtime", "device", "cuda:0:1", ["'cuda:0:1'"], id="device-two-colons"),
    pytest.param("runtime", "device", "cpu:1", ["'cpu:1'"], id="device-cpu-1"),
    pytest.param("runtime", "dtype", "int8", ["'int8'", *DTYPES], id="dtype-int8"),
    pytest.param("kv", "policy", "magic", ["'magic'", *KV_POLICIES], id="policy-magic"),
    pytest.param("kv", "sketch_dtype", "fp8", ["'fp8'", "auto", "int8", "int4"],
                 id="sketch-fp8"),
    pytest.param("model", "path", "  ", ["model.path is empty", "null"], id="path-blank"),
    pytest.param("kv", "lookahead_sm_share", 0.0, ["lookahead_sm_share is 0.0", "(0, 1]"],
                 id="sm-share-0"),
    pytest.param("kv", "lookahead_sm_share", 1.25, ["lookahead_sm_share is 1.25"],
                 id="sm-share-over-1"),
])
def test_impossible_value(section, key, value, expect):
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_dict({section: {key: value}})
    msg = str(e.value)
    for part in expect:
        assert part in msg


@pytest.mark.parametrize("device", [
    pytest.param("auto:1", id="auto-1"),
    pytest.param("cpu:12", id="cpu-12"),
])
def test_device_index_only_for_cuda(device):
    # Only 'cuda:N' takes an index (so says the error message). The check slices the
    # index at len("cuda:"), so for other 5-char-or-longer prefixes it looks at the
    # wrong characters: "cpu:1" is rejected but "cpu:12" and "auto:1" pass.
    with pytest.raises(ConfigError, match="cuda:N"):
        RuntimeConfig(device=device)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_valid_devices(device):
    assert RuntimeConfig(device=device).device == device


@pytest.mark.parametrize("dtype", DTYPES)
def test_valid_dtypes(dtype):
    assert EngineConfig.from_dict({"runtime": {"dtype": dtype}}).runtime.dtype == dtype


def test_smallest_possible_values_are_accepted():
    cfg = EngineConfig.from_dict({"runtime": {"max_context_tokens": 2, "prefill_chunk_tokens": 1,
                                              "progress_bar_min_tokens": 0}})
    assert cfg.runtime.max_context_tokens == 2
    assert cfg.runtime.prefill_chunk_tokens == 1


# ---------------------------------------------------------------- replace


def test_replace_changes_only_given_fields():
    base = EngineConfig.load("cpu-small")
    new = base.replace(runtime={"max_context_tokens": 1000, "cuda_graphs": True})
    assert new.runtime.max_context_tokens == 1000
    assert new.runtime.cuda_graphs is True
    assert new.runtime.device == "cpu"  # kept from base
    assert new.runtime.prefill_chunk_tokens == 512  # kept from base
    assert new.model == base.model and new.kv == base.kv
    # the original is untouched
    assert base.runtime.max_context_tokens == 4608
    assert base.runtime.cuda_graphs is False


def test_replace_several_sections():
    new = EngineConfig().replace(model={"path": "/x"}, runtime={"device": "cpu"})
    assert new.model.path == "/x"
    assert new.runtime.device == "cpu"


def test_replace_unknown_section():
    with pytest.raises(ConfigError) as e:
        EngineConfig().replace(runtim={"device": "cpu"})
    msg = str(e.value)
    assert "'runtim'" in msg
    assert "model, runtime, kv" in msg


def test_replace_unknown_key():
    with pytest.raises(ConfigError) as e:
        EngineConfig().replace(runtime={"devise": "cpu"})
    msg = str(e.value)
    assert "'devise'" in msg
    assert "section 'runtime'" in msg
    assert "device" in msg


@pytest.mark.parametrize("values, part", [
    pytest.param({"max_context_tokens": 1}, "at least 2", id="impossible"),
    pytest.param({"cuda_graphs": "no"}, "must be bool", id="wrong-type"),
])
def test_replace_validates(values, part):
    with pytest.raises(ConfigError, match=part):
        EngineConfig().replace(runtime=values)


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError):
        EngineConfig.from_dict({"runtime": {"dtype": "int8"}})


def test_int4_sketch_needs_an_even_rank():
    with pytest.raises(ConfigError, match="kv.rank is 3 with kv.sketch_dtype int4"):
        EngineConfig.from_dict({"kv": {"rank": 3, "sketch_dtype": "int4"}})
    assert EngineConfig.from_dict({"kv": {"rank": 3, "sketch_dtype": "int8"}}).kv.rank == 3


def test_odd_rank_with_the_default_int4_sketch_names_both_ways_out():
    with pytest.raises(ConfigError, match=r"kv.rank is 5 with kv.sketch_dtype int4 \(the "
                                          r"default\).*use an even rank, or sketch_dtype: auto"):
        EngineConfig.from_dict({"kv": {"policy": "retrieval", "rank": 5}})
    cfg = EngineConfig.from_dict({"kv": {"rank": 5, "sketch_dtype": "auto"}})
    assert resolve_for_shape(cfg.kv, 64).rank == 5


@pytest.mark.parametrize("shape", ["smollm2-135m", "llama-3-8b"])  # head_dim 64, 128
def test_default_sketch_is_half_the_head_dim_in_int4(shape):
    D = NAMED_SHAPES[shape].head_dim
    cfg = EngineConfig.from_dict({"kv": {"policy": "retrieval"}})
    assert (cfg.kv.rank, cfg.kv.sketch_dtype) == (None, "int4")  # resolved with the shape
    kv = resolve_for_shape(cfg.kv, D)
    assert (kv.rank, kv.sketch_dtype) == (D // 2, "int4")
    assert cfg.for_shape(D).kv == kv
    assert resolve_for_shape(kv, D) is kv  # resolving twice changes nothing
    assert EngineConfig.from_dict({"kv": {"rank": None}}) == EngineConfig()  # YAML null


@pytest.mark.parametrize("kv", [{"rank": 16}, {"rank": 16, "sketch_dtype": "auto"},
                                {"rank": 128, "sketch_dtype": "int8"}])
def test_explicit_rank_is_kept(kv):
    cfg = KVConfig(policy="retrieval", **kv)
    assert resolve_for_shape(cfg, 128) is cfg
    assert EngineConfig(kv=cfg).for_shape(128).kv == cfg


def test_default_rank_of_a_tiny_head_stays_valid():
    """Half of a head_dim of 6 is 3: an int4 sketch takes 2 (even), a float one 3."""
    assert resolve_for_shape(KVConfig(policy="retrieval"), 6).rank == 2
    assert resolve_for_shape(KVConfig(policy="retrieval", sketch_dtype="auto"), 6).rank == 3


@pytest.mark.parametrize("block", [0, 65])
def test_select_block_range(block):
    with pytest.raises(ConfigError, match=f"kv.select_block is {block}: use 1"):
        EngineConfig.from_dict({"kv": {"policy": "retrieval", "select_block": block}})


def test_select_block_needs_the_lowrank_retriever():
    with pytest.raises(ConfigError, match="set kv.select_block: 1 or index.kind: lowrank"):
        EngineConfig.from_dict({"kv": {"policy": "retrieval", "select_block": 4},
                                "index": {"kind": "attention"}})
    cfg = EngineConfig.from_dict({"kv": {"policy": "retrieval", "select_block": 4}})
    assert cfg.kv.select_block == 4


@pytest.mark.parametrize("passes", [0, 3])
def test_score_passes_are_one_or_two(passes):
    with pytest.raises(ConfigError, match=f"kv.score_passes is {passes}: use 1"):
        EngineConfig.from_dict({"kv": {"policy": "retrieval", "score_passes": passes}})
    assert EngineConfig.from_dict({"kv": {"score_passes": 2}}).kv.score_passes == 2


def test_rerank_blocks_needs_runs_and_a_rerank():
    with pytest.raises(ConfigError, match="kv.select_block is 1 and kv.rerank_factor 2"):
        EngineConfig.from_dict({"kv": {"policy": "retrieval", "rerank_blocks": True,
                                       "rerank_factor": 2}})
    cfg = EngineConfig.from_dict({"kv": {"policy": "retrieval", "rerank_blocks": True,
                                         "select_block": 4, "rerank_factor": 2}})
    assert cfg.kv.rerank_blocks


@pytest.mark.parametrize("kv, index, batch, says", [
    ({"select_block": 4}, {"kind": "attention"}, 1, "host indexes return single tokens"),
    ({"policy": "dense"}, {"kind": "attention"}, 1, "host indexes serve kv.policy retrieval"),
    ({}, {"kind": "attention"}, 2, "use index.kind lowrank for batched decode"),
    ({"lookahead_from": 2}, {"kind": "hnswlib"}, 1, "use kv.lookahead_from 0"),
    ({"host_dtype": "int8"}, {"kind": "faiss-ivf"}, 1, "use kv.host_dtype auto"),
    ({"store_on": "device"}, {"kind": "hybrid"}, 1, "use kv.store_on host"),
])
def test_every_cross_section_rule_is_refused_when_the_config_is_made(kv, index, batch, says):
    """All rules between sections live in config.check_sections, run when an EngineConfig
    is made (before any weights load), and by make_kv_policy for policies made from parts."""
    data = {"kv": {"policy": "retrieval", **kv}, "index": index,
            "runtime": {"max_batch": batch}}
    with pytest.raises(ConfigError, match=says):
        EngineConfig.from_dict(data)


def test_shape_rules_are_refused_before_the_weights_load(monkeypatch):
    """kv.rank past head_dim and kv.lookahead_from past the last layer: refused by LLM
    after reading the model's shape, before loading its weights."""
    from retrieval_attn import LLM

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the config was checked")

    monkeypatch.setattr("retrieval_attn.api.load_model", no_weights)
    for kv, says in (({"rank": 66}, "head_dim is 64"), ({"lookahead_from": 30}, "30 layers")):
        with pytest.raises(ConfigError, match=says):
            LLM(config={"runtime": {"device": "cpu"}, "kv": {"policy": "retrieval", **kv}})

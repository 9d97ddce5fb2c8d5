"""Memory planner: arithmetic on known shapes, equality with what the policies allocate,
refusals with numbers, the presets validated without allocating, search and YAML."""

import re

import pytest
import torch

from retrieval_attn.config import EngineConfig, preset_path
from retrieval_attn.errors import ConfigError
from retrieval_attn.model.llama import Llama
from retrieval_attn.model.spec import NAMED_SHAPES, ModelSpec
from retrieval_attn.offload.make import make_kv_policy
from retrieval_attn.planner import (
    DEVICE_LOOKAHEAD_SM_SHARE,
    check_budget,
    largest_batch,
    largest_prefill_chunk,
    param_count,
    parse_bytes,
    plan_memory,
    search_config,
    to_yaml,
)
from retrieval_attn.tools.plan import main as plan_main

GiB = 1 << 30
QWEN, LLAMA = NAMED_SHAPES["qwen2.5-7b-1m"], NAMED_SHAPES["llama-3-8b"]
TINY = ModelSpec(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                 num_heads=6, num_kv_heads=2, head_dim=8)


def config(policy="dense", tokens=1 << 20, device="cuda", dtype="bfloat16", **kv):
    return EngineConfig.from_dict({
        "runtime": {"device": device, "dtype": dtype, "max_context_tokens": tokens,
                    "prefill_chunk_tokens": 2048},
        "kv": {"policy": policy, **kv}})


def part(plan, name):
    return next(p.nbytes for p in plan.parts if p.name == name)


def test_dense_kv_of_known_shapes():
    qwen = plan_memory(QWEN, config(), "cuda")
    assert part(qwen, "kv: dense K,V") == 28 * 4 * 128 * 2 * 2 * (1 << 20)  # 56 GiB
    assert QWEN.kv_bytes_per_token == 57344  # "57 KB"
    llama = plan_memory(LLAMA, config(tokens=1 << 19), "cuda")
    assert part(llama, "kv: dense K,V") == 131072 * (1 << 19)  # 131 KB/token, 64 GiB
    assert qwen.kv_bytes("gpu") == part(qwen, "kv: dense K,V")


@pytest.fixture
def meta_device(monkeypatch):
    """Make `with torch.device("meta")` allocate nothing again. conftest's NaN-filling
    torch.empty is not in torch's cached list of factory functions, so under it the device
    context is skipped and a model is really built on the CPU (32 GB for Llama-3-8B)."""
    from torch.utils import _device

    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)
    _device._device_constructors.cache_clear()
    _device._device_constructors()  # cached with the real torch.empty, for later tests too


@pytest.mark.parametrize("shape", list(NAMED_SHAPES))
def test_param_count_equals_the_model(meta_device, shape):
    spec = NAMED_SHAPES[shape]
    with torch.device("meta"):
        model = Llama(spec)
    assert param_count(spec) == sum(p.numel() for p in model.parameters())


def test_smollm2_weights():
    spec = NAMED_SHAPES["smollm2-135m"]
    assert abs(param_count(spec) - 134.5e6) < 0.1e6
    plan = plan_memory(spec, config(tokens=8192, device="cpu", dtype="auto"), "cpu")
    assert part(plan, "weights") == param_count(spec) * 4  # fp32 on the CPU


def test_low_rank_and_window_arithmetic():
    plan = plan_memory(QWEN, config("retrieval", rank=32, sketch_dtype="auto",
                                    window_tokens=512, sink_tokens=4), "cuda")
    N, L, Hkv, D = 1 << 20, 28, 4, 128
    assert part(plan, "kv: low-rank keys") == L * Hkv * (D + D * 32 + N * 32) * 2
    assert part(plan, "kv: window + sinks K,V") == 2 * L * Hkv * 516 * D * 2
    assert part(plan, "kv: host K,V store") == 2 * L * Hkv * N * D * 2
    assert part(plan, "prefill: one-layer K,V scratch") == 2 * Hkv * N * D * 2
    # pinned by registration, exactly: no power-of-two rounding part
    assert not [p for p in plan.parts if "rounding" in p.name]


@pytest.mark.parametrize("spec", [QWEN, NAMED_SHAPES["smollm2-135m"]], ids=["D128", "D64"])
def test_default_rank_is_planned_as_half_the_head_dim(spec):
    """kv.rank None: the plan is the plan of rank head_dim / 2 in int4, and says so."""
    r = spec.head_dim // 2
    plan = plan_memory(spec, config("retrieval"), "cuda")
    same = plan_memory(spec, config("retrieval", rank=r, sketch_dtype="int4"), "cuda")
    assert plan.config.kv.rank == r and plan.parts == same.parts
    assert f" r={r}" in plan.table()
    with pytest.raises(ConfigError, match=f"kv.rank {r},.*lower kv.rank to {r // 2}"):
        check_budget(plan, plan.peak("gpu") - part(plan, "kv: low-rank keys") // 4,
                     128 * GiB)


@pytest.mark.parametrize("policy,top_k", [("dense", 8), ("streaming", 0.25), ("quest", 12),
                                          ("retrieval", 0.1)])
def test_kv_parts_equal_what_the_policy_allocates(policy, top_k):
    N, n = 100, 77
    cfg = config(policy, tokens=N, device="cpu", dtype="float32", top_k=top_k, rank=4,
                 window_tokens=9, sink_tokens=2, page_tokens=16)
    plan = plan_memory(TINY, cfg, "cpu", prompt_tokens=n)
    assert plan.kv_bytes("gpu") == 0
    kv = make_kv_policy(cfg.kv, TINY.num_layers, TINY.num_heads, TINY.num_kv_heads,
                        TINY.head_dim, N, torch.device("cpu"), torch.float32)
    if policy == "dense":
        assert kv.memory_bytes() == {"host": plan.kv_bytes("host")}
        return
    scratch = part(plan, "prefill: one-layer K,V scratch")
    kv.start_request()
    shape = (TINY.num_layers, TINY.num_kv_heads, n, TINY.head_dim)
    kv.ingest(torch.randn(shape), torch.randn(shape))  # a prompt of n tokens: window, index
    assert kv.memory_bytes() == {"host": plan.kv_bytes("host") + scratch}
    kv.finish_prefill(n)
    assert kv.memory_bytes() == {"host": plan.kv_bytes("host")}


def test_weights_equal_allocated_bytes(meta_device):
    with torch.device("meta"):
        model = Llama(TINY).to(torch.bfloat16)
    allocated = sum(p.numel() * p.element_size() for p in model.parameters())
    assert part(plan_memory(TINY, config(tokens=64), "cuda"), "weights") == allocated


def test_dense_1m_refused_with_numbers_and_fixes():
    plan = plan_memory(QWEN, config(), "cuda")
    with pytest.raises(ConfigError) as err:
        check_budget(plan, 64 * GiB, 128 * GiB)
    msg = str(err.value)
    assert "gpu memory: needs" in msg and "64.00 GiB available" in msg
    assert "kv: dense K,V 56.00 GiB" in msg
    assert "lower runtime.max_context_tokens to" in msg
    assert "use kv.policy retrieval (with kv.rank" in msg


def test_dense_prefill_holds_one_chunk_of_hidden_states():
    # dense prefill is chunk-major (engine/runner.py): one chunk's hidden states, so the
    # 1M Qwen shape fits an 80 GB H100 with a small chunk (57 GB KV + 15 GB weights)
    cfg = config().replace(runtime={"prefill_chunk_tokens": 512, "max_context_tokens": 1 << 20})
    plan = plan_memory(QWEN, cfg, "cuda")
    assert part(plan, "prefill: hidden states") == 512 * QWEN.hidden_size * 2
    check_budget(plan, 79 * GiB, 128 * GiB)
    sparse = plan_memory(QWEN, config("retrieval", rank=32), "cuda")  # layer-major
    assert part(sparse, "prefill: hidden states") == (1 << 20) * QWEN.hidden_size * 2
    # at 2048 tokens the chunk's attention mask (6 GiB) tips it over 75 GiB: the fix names
    # the largest chunk that fits, the one bench_decode picks
    big = plan_memory(QWEN, config(), "cuda")
    with pytest.raises(ConfigError, match="lower runtime.prefill_chunk_tokens to 1024"):
        check_budget(big, 75 * GiB, 128 * GiB)
    assert largest_prefill_chunk(big, 75 * GiB, 128 * GiB, 2048) == 1024
    assert largest_prefill_chunk(big, 60 * GiB, 128 * GiB, 2048) is None


def test_host_overflow_refused_with_numbers():
    # Llama-3-8B shape at 1M: K and V need 64 GiB each on the host, plus the runtime
    plan = plan_memory(LLAMA, config("retrieval", tokens=1 << 20, rank=32), "cuda")
    assert part(plan, "kv: host K,V store") == 128 * GiB
    with pytest.raises(ConfigError) as err:
        check_budget(plan, 80 * GiB, 128 * GiB)
    msg = str(err.value)
    assert "host memory: needs" in msg and "128.00 GiB available" in msg
    fit = int(re.search(r"lower runtime.max_context_tokens to (\d+)", msg).group(1))
    assert 0.95 * (1 << 20) < fit < 1 << 20
    over = plan_memory(LLAMA, config("retrieval", tokens=fit + 1, rank=32), "cuda")
    assert not over.fits(80 * GiB, 128 * GiB)  # the fix named is the largest that fits
    assert plan_memory(LLAMA, config("retrieval", tokens=fit, rank=32),
                       "cuda").fits(80 * GiB, 128 * GiB)


def test_batch_multiplies_every_kv_part_and_the_largest_batch_fits():
    one = plan_memory(QWEN, config("retrieval", tokens=131072, rank=32), "cuda")
    four = plan_memory(QWEN, config("retrieval", tokens=131072, rank=32).replace(
        runtime={"max_batch": 4}), "cuda")
    for name in ("kv: host K,V store", "kv: low-rank keys", "kv: window + sinks K,V"):
        assert part(four, name) == 4 * part(one, name)
    # prefill runs one sequence at a time
    scratch = "prefill: one-layer K,V scratch"
    assert part(four, scratch) == part(one, scratch)
    cfg = config("retrieval", tokens=131072, rank=32)
    best = largest_batch(QWEN, cfg, 80 * GiB, 128 * GiB)
    assert part(one, "kv: host K,V store") == 7 * GiB  # per sequence at 128K: host-bound
    assert best == 18  # 18 x 7 GiB + 0.75 GiB runtime + the rotary build fit 128 GiB
    assert plan_memory(QWEN, cfg.replace(runtime={"max_batch": best}),
                       "cuda").fits(80 * GiB, 128 * GiB)
    too_many = plan_memory(QWEN, cfg.replace(runtime={"max_batch": best + 1}), "cuda")
    with pytest.raises(ConfigError, match=f"lower runtime.max_batch to {best}"):
        check_budget(too_many, 80 * GiB, 128 * GiB)
    dense = config("dense", tokens=131072)
    assert largest_batch(QWEN, dense, 80 * GiB, 128 * GiB) < best  # dense KV is in HBM


def test_impossible_search_names_the_smallest_config():
    with pytest.raises(ConfigError) as err:
        search_config(QWEN, 1 << 20, 12 * GiB, 128 * GiB)  # the weights alone are 14.2 GiB
    msg = str(err.value)
    assert "no config fits" in msg and "weights 14.19 GiB" in msg and "kv.rank 1" in msg


# 1M: the 12 GB; Llama at 512K keeps its int8 store on the GPU, under dense's K,V
@pytest.mark.parametrize("name,shape,kv_cap", [("1m-single-gpu", "qwen2.5-7b-1m", 12e9),
                                               ("512k-llama3-8b", "llama-3-8b", 64 * GiB)])
def test_presets_fit_without_allocating(monkeypatch, name, shape, kv_cap):
    def refuse(*args, **kwargs):
        raise AssertionError("the planner allocated a tensor")

    for fn in ("zeros", "empty", "full", "ones", "randn"):
        monkeypatch.setattr(torch, fn, refuse)
    cfg = EngineConfig.load(name)
    assert cfg.model.path == f"random:{shape}"
    plan = plan_memory(NAMED_SHAPES[shape], cfg, "cuda")
    check_budget(plan, 80 * GiB, 128 * GiB)
    assert plan.kv_bytes("gpu") <= kv_cap


def test_search_prefers_dense_when_it_fits():
    cfg = search_config(NAMED_SHAPES["smollm2-135m"], 8192, 80 * GiB, 128 * GiB)
    assert cfg.kv.policy == "dense"


def test_search_falls_back_to_retrieval_with_largest_rank():
    # dense at 1M just fits 80 GiB (a 512-token prefill chunk); 72 GiB it does not
    assert search_config(QWEN, 1 << 20, 80 * GiB, 128 * GiB).kv.policy == "dense"
    cfg = search_config(QWEN, 1 << 20, 72 * GiB, 128 * GiB)
    # full rank in int8: half the dense keys' bytes, the most a sketch may take
    assert (cfg.kv.policy, cfg.kv.rank, cfg.kv.sketch_dtype) == ("retrieval", 128, "int8")
    capped = search_config(QWEN, (1 << 20) + 4096, 80 * GiB, 128 * GiB, max_kv_gpu_bytes=12e9)
    # int8 at rank 128 would need 15 GB; int4 keeps the rank at the bytes of bf16 rank 32
    assert (capped.kv.rank, capped.kv.sketch_dtype) == (128, "int4")
    assert plan_memory(QWEN, capped, "cuda").kv_bytes("gpu") <= 12e9
    cfg = search_config(QWEN, 1 << 20, 40 * GiB, 128 * GiB)  # a smaller GPU: a smaller sketch
    plan = plan_memory(QWEN, cfg, "cuda")
    assert plan.peak("gpu") <= 40 * GiB * 0.95
    assert cfg.kv.rank < 128 or cfg.kv.sketch_dtype == "int4"


def test_sketch_search_order_is_rank_then_precision_within_half_the_dense_keys():
    from retrieval_attn.planner import _sketches

    order = _sketches(128, 2)  # bfloat16 keys: 256 bytes per token, the cap 128
    assert order[:4] == [(128, "int8"), (128, "int4"), (64, "auto"), (64, "int8")]
    assert all(r * {"auto": 2, "int8": 1, "int4": 0.5}[d] <= 128 for r, d in order)
    assert _sketches(64, 4)[:2] == [(64, "int8"), (64, "int4")]  # float32: 4 bytes a value
    assert (32, "int4") not in _sketches(64, 2)  # the kernel dots int4 in halves of >= 32


@pytest.mark.parametrize("sketch, rank", [("auto", 32), ("int8", 64), ("int4", 64), ("int4", 128)])
def test_sketch_bytes_are_what_low_rank_keys_allocates(sketch, rank):
    from retrieval_attn.offload.lowrank import LowRankKeys

    N = 1 << 20
    plan = plan_memory(QWEN, config("retrieval", rank=rank).replace(
        kv={"sketch_dtype": sketch}), "cuda")
    keys = LowRankKeys(QWEN.num_layers, QWEN.num_kv_heads, N, QWEN.head_dim, rank,
                       torch.device("meta"), torch.bfloat16, sketch)
    assert part(plan, "kv: low-rank keys") == sum(keys.memory_bytes().values())


def test_quantised_sketch_of_the_same_bytes_costs_the_same():
    # int8 of rank 64 and int4 of rank 128 hold the bytes of bfloat16 rank 32, plus float32
    # basis and scales (< 1%)
    bf16 = part(plan_memory(QWEN, config("retrieval", rank=32, sketch_dtype="auto"), "cuda"),
                "kv: low-rank keys")
    for sketch, rank in (("int8", 64), ("int4", 128)):
        plan = plan_memory(QWEN, config("retrieval", rank=rank).replace(
            kv={"sketch_dtype": sketch}), "cuda")
        assert 0 < part(plan, "kv: low-rank keys") - bf16 < 0.01 * bf16


def test_search_skips_integer_sketches_the_kernel_cannot_score():
    from retrieval_attn.kernels.select_scores import kernel_scores
    from retrieval_attn.planner import _key_bits, _sketches

    for rank, sketch in _sketches(128, 2) + _sketches(64, 4):
        assert sketch == "auto" or kernel_scores(rank, _key_bits(sketch))
    # a smaller GPU (where the first candidates do not fit): no integer sketch the kernel
    # cannot score (rank 32 int4 fitted here before)
    cfg = search_config(QWEN, 1 << 20, 34 * GiB, 128 * GiB)
    assert cfg.kv.sketch_dtype == "auto" or kernel_scores(cfg.kv.rank,
                                                          _key_bits(cfg.kv.sketch_dtype))


def test_over_budget_retrieval_suggests_a_smaller_sketch_dtype():
    cfg = config("retrieval", rank=128).replace(kv={"sketch_dtype": "int8"})
    plan = plan_memory(QWEN, cfg, "cuda")
    need = plan.peak("gpu")
    with pytest.raises(ConfigError, match="set kv.sketch_dtype int4"):
        check_budget(plan, need - 2 * GiB, 128 * GiB)


def test_yaml_round_trip(tmp_path):
    cfg = search_config(QWEN, 1 << 20, 80 * GiB, 128 * GiB, model_path="random:qwen2.5-7b-1m")
    for one in (cfg, EngineConfig(), EngineConfig.load(preset_path("1m-single-gpu"))):
        path = tmp_path / "preset.yaml"
        path.write_text(to_yaml(one, header="a header\nover two lines"))
        assert EngineConfig.from_yaml(path) == one


@pytest.mark.parametrize("text,expected", [("80GiB", 80 * GiB), ("128GB", 128 * 10**9),
                                           ("1.5 TiB", 3 * 2**39), ("4096", 4096),
                                           ("512mib", 512 * 2**20), (7, 7)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text,words", [("80G", "ambiguous"), ("lots", "not a memory size"),
                                        ("12 parsecs", "not a memory size")])
def test_parse_bytes_errors(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_bytes(text)


def test_cli_prints_plan_and_writes_preset(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    rc = plan_main(["--model", "qwen2.5-7b-1m", "--context", "1052672", "--gpu-mem", "80GiB",
                    "--host-mem", "128GiB", "--max-kv-gpu-mem", "8GB", "--max-rank", "64",
                    "--rerank-factor", "2", "--select-block", "4", "--host-dtype", "int8",
                    "--lookahead-from", "3", "--write", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "kv: low-rank keys" in text and "kv: host K,V store" in text
    cfg = EngineConfig.from_yaml(out)
    # under 8 GB of KV state the int8 rank-64 sketch (9.0 GB) becomes int4 of that rank
    assert (cfg.kv.policy, cfg.kv.rank, cfg.kv.sketch_dtype) == ("retrieval", 64, "int4")
    assert cfg == EngineConfig.load("1m-single-gpu")  # the preset is what the planner chose


def test_llama_512k_preset_is_the_plan_of_its_command(tmp_path, capsys):
    """The cap on the KV state turns the int8 sketch of rank 64 (41.6 GiB with the store)
    into an int4 one of the same rank: half the bytes each decode step scores."""
    out = tmp_path / "plan.yaml"
    args = ["--model", "llama-3-8b", "--context", "524288", "--gpu-mem", "80GiB",
            "--host-mem", "128GiB", "--max-rank", "64", "--rerank-factor", "1",
            "--top-k", "4096", "--select-block", "4", "--host-dtype", "int8",
            "--lookahead-from", "3", "--store-on", "device"]
    assert plan_main(args + ["--write", str(out)]) == 0
    assert EngineConfig.from_yaml(out).kv.sketch_dtype == "int8"
    assert plan_main(args + ["--max-kv-gpu-mem", "40GiB", "--write", str(out)]) == 0
    capsys.readouterr()
    cfg = EngineConfig.from_yaml(out)
    assert (cfg.kv.rank, cfg.kv.sketch_dtype, cfg.kv.lookahead_sm_share) == (64, "int4", 0.75)
    assert cfg == EngineConfig.load("512k-llama3-8b")  # the preset is what the planner chose


def test_cli_check_mode_refuses_over_budget(capsys):
    with pytest.raises(ConfigError, match="gpu memory: needs"):
        plan_main(["--config", "1m-single-gpu", "--gpu-mem", "24GiB", "--host-mem", "128GiB"])


def test_store_on_device_moves_the_store_to_the_gpu_and_auto_moves_it_where_it_fits():
    kv = dict(rank=64, sketch_dtype="int8", host_dtype="int8", select_block=4,
              rerank_factor=2)
    host = plan_memory(LLAMA, config("retrieval", tokens=1 << 19, **kv), "cuda")
    dev = plan_memory(LLAMA, config("retrieval", tokens=1 << 19, store_on="device", **kv),
                      "cuda")
    store = part(host, "kv: host K,V store")
    assert store == part(dev, "kv: K,V store on the device") == 32 * GiB  # int8 K, V
    assert dev.kv_bytes("gpu") == host.kv_bytes("gpu") + store
    assert dev.kv_bytes("host") == host.kv_bytes("host") - store
    args = dict(policy="retrieval", max_rank=64, rerank_factor=2, select_block=4,
                host_dtype="int8")
    moved = search_config(LLAMA, 1 << 18, 80 * GiB, 128 * GiB, store_on="auto", **args)
    stays = search_config(LLAMA, 1 << 20, 80 * GiB, 256 * GiB, store_on="auto", **args)
    assert (moved.kv.store_on, stays.kv.store_on) == ("device", "host")
    # lookahead's scoring pass leaves SMs to the layer beside it only with the store on
    # the device (on the host that layer waits on PCIe, not on SMs)
    assert moved.kv.lookahead_sm_share == stays.kv.lookahead_sm_share == 1.0  # no lookahead
    ahead = dict(args, lookahead_from=3)
    assert search_config(LLAMA, 1 << 18, 80 * GiB, 128 * GiB, store_on="auto",
                         **ahead).kv.lookahead_sm_share == DEVICE_LOOKAHEAD_SM_SHARE
    assert search_config(LLAMA, 1 << 20, 80 * GiB, 256 * GiB, store_on="auto",
                         **ahead).kv.lookahead_sm_share == 1.0
    assert moved.kv.rank == search_config(LLAMA, 1 << 18, 80 * GiB, 128 * GiB, **args).kv.rank
    with pytest.raises(ConfigError, match="gpu memory: needs"):
        check_budget(plan_memory(LLAMA, stays.replace(kv={"store_on": "device"}), "cuda"),
                     80 * GiB, 256 * GiB)


def test_a_device_store_that_does_not_fit_is_refused_naming_the_host_store(capsys):
    # Llama-3-8B at 512K on a 48 GiB GPU: the int8 store (32 GiB) does not fit beside the
    # weights; in host memory it does
    cfg = EngineConfig.load("512k-llama3-8b")
    with pytest.raises(ConfigError, match="set kv.store_on host"):
        check_budget(plan_memory(LLAMA, cfg, "cuda"), 48 * GiB, 128 * GiB)
    check_budget(plan_memory(LLAMA, cfg.replace(kv={"store_on": "host"}), "cuda"),
                 48 * GiB, 128 * GiB)
    assert plan_main(["--model", "llama-3-8b", "--context", "262144", "--gpu-mem", "80GiB",
                      "--host-mem", "128GiB", "--policy", "retrieval", "--max-rank", "64",
                      "--host-dtype", "int8", "--store-on", "auto"]) == 0
    assert "store_on: device" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, words", [
    ({"prefill_chunk_tokens": 0}, "prefill_chunk_tokens is 0"),
    ({"max_rank": 0}, "max_rank is 0"),
])
def test_search_refuses_impossible_bounds(kwargs, words):
    """chunk 0 silently planned 128; max_rank 0 said 'under inf GiB' (issue 27)"""
    with pytest.raises(ConfigError, match=words):
        search_config(NAMED_SHAPES["smollm2-135m"], 4096, 8 * 2**30, 16 * 2**30, **kwargs)

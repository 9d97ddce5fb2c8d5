"""Decode ms/token at long contexts: retrieval vs dense in HBM vs full offload, same run.

Random weights of a real shape (speed does not depend on weight values). The prompt's K, V
are synthetic (random, written layer by layer into each policy's state, as prefill would),
so 512K-1M contexts are measured without a 10-minute prefill; the output says so. Each
policy runs alone (the previous one freed) and decodes with the engine's CUDA graph where
the policy allows it. `retrieval-ann` is the ANN path: host graphs per (layer, kv head), built
in-process from random prompt queries, searched on the host every layer (no CUDA graph).

    python -m retrieval_attn.tools.bench_decode --shape qwen2.5-7b-1m --contexts 131072 1048576
    python -m retrieval_attn.tools.bench_decode --contexts 131072 --batches 1 max

--batches runs B sequences in lockstep (runtime.max_batch B); "max" is the largest batch
the planner fits in this machine's free GPU and host memory, per policy (full offload,
which the planner does not model, runs at retrieval's). ms/token is per decode step;
tok/s counts every sequence.
"""

from __future__ import annotations

import argparse
import os
import re
import time

import torch

from retrieval_attn import LLM, EngineConfig
from retrieval_attn.engine import GenerationStats
from retrieval_attn.errors import RetrievalAttnError
from retrieval_attn.offload.dense import DenseKV
from retrieval_attn.offload.full_offload import FullOffloadKV
from retrieval_attn.offload.sparse import SparseKV
from retrieval_attn.planner import plan_memory
from retrieval_attn.sampling import SamplingParams
from retrieval_attn.tools.bench_grid import free_device, run_grid, write_json
from retrieval_attn.tools.bench_step_parts import (
    bench_gathers,
    bench_scores,
    bench_tail,
    bench_topk,
)

GiB = 1 << 30
# bench policy -> kv.policy; retrieval-ann also sets index.kind attention (host graphs)
POLICY = {"full-offload": "dense", "retrieval-notail": "retrieval", "retrieval-ann": "retrieval"}
# per-policy overrides of the retrieval sketch and selection, e.g.
# retrieval:sketch=int4,rank=128,rerank=2,block=4,topk=4096,passes=2,final=blocks,host=int8,
# ahead=2,store=device,sms=0.75
OVERRIDES = {"sketch": ("sketch_dtype", str), "rank": ("rank", int),
             "rerank": ("rerank_factor", int), "block": ("select_block", int),
             "topk": ("top_k", int), "passes": ("score_passes", int),
             "final": ("rerank_blocks", lambda v: {"blocks": True, "positions": False}[v]),
             "host": ("host_dtype", str), "ahead": ("lookahead_from", int),
             "store": ("store_on", str), "sms": ("lookahead_sm_share", float)}


def parse_policy(name: str) -> tuple[str, dict]:
    """'retrieval:sketch=int4,rank=128,rerank=2' -> ('retrieval', kv overrides): variants
    of the retrieval sketch side by side in one run."""
    base, _, rest = name.partition(":")
    kv = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in OVERRIDES or not value or not base.startswith("retrieval"):
            raise RetrievalAttnError(f"policy {name!r}: overrides are retrieval policies' "
                                     f"{', '.join(k + '=' for k in OVERRIDES)}")
        field, kind = OVERRIDES[key]
        try:
            kv[field] = kind(value)
        except (KeyError, ValueError):
            raise RetrievalAttnError(f"policy {name!r}: {key}={value} is not a valid "
                                     f"value") from None
    return base, kv


def fill(llm: LLM, n: int, seed: int = 0, batch: int = 1) -> None:
    """Synthetic prompt K, V for n tokens of every sequence into the engine's policy, one
    layer at a time: [B·Hkv, n, D] per layer."""
    spec, kv = llm.loaded.spec, llm.engine.kv
    dev, dtype = llm.device, llm.dtype
    gen = torch.Generator(device=dev).manual_seed(seed)

    def layers():
        for _ in range(spec.num_layers):
            shape = (batch * spec.num_kv_heads, n, spec.head_dim)
            kv_pair = (torch.randn(shape, generator=gen, device=dev, dtype=dtype),
                       torch.randn(shape, generator=gen, device=dev, dtype=dtype))
            if isinstance(kv, SparseKV) and kv.ann is not None:  # prompt queries to build from
                kv_pair += (torch.randn((spec.num_heads, n, spec.head_dim), generator=gen,
                                        device=dev, dtype=dtype),)
            yield kv_pair

    if isinstance(kv, SparseKV):
        kv.ingest_layers(layers(), n)
    elif isinstance(kv, DenseKV):
        for layer, (k, v) in enumerate(layers()):
            kv.k[layer, :, :, :n] = k.view(batch, spec.num_kv_heads, n, -1)
            kv.v[layer, :, :, :n] = v.view(batch, spec.num_kv_heads, n, -1)
    else:
        for layer, (k, v) in enumerate(layers()):
            kv.fill(layer, k, v)


def bench_config(shape: str, policy: str, n: int, new_tokens: int, top_k: int, rank: int,
                 rerank_factor: int = 4, batch: int = 1,
                 sketch_dtype: str = "auto", select_block: int = 1) -> EngineConfig:
    policy, overrides = parse_policy(policy)
    return EngineConfig.load("default").replace(
        model={"path": f"random:{shape}"},
        runtime={"device": "cuda", "dtype": "bfloat16", "max_context_tokens": n + new_tokens + 8,
                 "prefill_chunk_tokens": 2048, "progress_bar": False, "max_batch": batch},
        kv={"policy": POLICY.get(policy, policy),
            "top_k": top_k, "rank": rank, "rerank_factor": rerank_factor,
            "sketch_dtype": sketch_dtype, "select_block": select_block,
            "tail_estimate": policy == "retrieval", **overrides},
        # the ANN path: attention-aware graphs, built in-process (no Ray on the GPU machine)
        index={"kind": "attention" if policy == "retrieval-ann" else "lowrank",
               "builder": "inline"})


def fit_prefill_chunk(shape: str, cfg: EngineConfig) -> EngineConfig:
    """cfg with the largest prefill chunk (at most its own) that the planner fits in the
    memory free now. The bench never prefills, but LLM(...) checks the whole plan first, and
    dense at 1M fits an 80 GB GPU only with a small chunk's attention mask."""
    from retrieval_attn.planner import available_memory, largest_prefill_chunk

    free_device()
    chunk = largest_prefill_chunk(plan_memory(LLM_spec(shape), cfg, "cuda"),
                                  *available_memory(torch.device("cuda")),
                                  cfg.runtime.prefill_chunk_tokens)
    # none fits: LLM(...) refuses cfg with the numbers
    return cfg if chunk is None else cfg.replace(runtime={"prefill_chunk_tokens": chunk})


def largest_batch_here(shape: str, policy: str, n: int, new_tokens: int, top_k: int,
                       rank: int, sketch_dtype: str = "auto", select_block: int = 1) -> int:
    """The planner's largest batch for this policy in the memory free right now."""
    from retrieval_attn.planner import available_memory, largest_batch

    free_device()
    cfg = bench_config(shape, "retrieval" if policy == "full-offload" else policy, n,
                       new_tokens, top_k, rank, sketch_dtype=sketch_dtype,
                       select_block=select_block)
    return largest_batch(LLM_spec(shape), cfg, *available_memory(torch.device("cuda")))


def run_one(shape: str, policy: str, n: int, new_tokens: int, top_k: int, rank: int,
            profile: bool = False, rerank_factor: int = 4, sketch_dtype: str = "auto",
            profile_path: str | None = None, batch: int = 1, select_block: int = 1,
            profile_rows: int = 30, trace_dir: str | None = None,
            profile_graph: bool = False) -> dict:
    cfg = bench_config(shape, policy, n, new_tokens, top_k, rank, rerank_factor, batch,
                       sketch_dtype, select_block)
    if policy != "full-offload":
        cfg = fit_prefill_chunk(shape, cfg)
    # The planner knows dense and sparse policies, not full offload (built here by hand):
    # its dense plan would count the whole cache on the GPU.
    predicted = (None if policy == "full-offload"
                 else plan_memory(LLM_spec(shape), cfg, "cuda", prompt_tokens=n))
    torch.cuda.reset_peak_memory_stats()
    llm = LLM(config=cfg) if policy != "full-offload" else _full_offload_llm(cfg)
    print(f"  kv: rank {cfg.kv.rank} {cfg.kv.sketch_dtype} sketch, rerank x"
          f"{cfg.kv.rerank_factor}, blocks of {cfg.kv.select_block}, tail {cfg.kv.tail_estimate}",
          flush=True)
    t = time.perf_counter()
    fill(llm, n, batch=batch)
    fill_s = time.perf_counter() - t
    engine, params = llm.engine, SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    logits = torch.zeros(llm.loaded.spec.vocab_size, device="cuda")
    list(engine.decode(logits, n, SamplingParams(max_tokens=3, ignore_eos=True),
                       GenerationStats()))  # warm-up + graph capture
    ann = getattr(engine.kv, "ann", None)
    if ann is not None:
        ann.served, ann.search_s = {"index": 0, "lowrank": 0}, 0.0
    torch.cuda.synchronize()
    t = time.perf_counter()
    list(engine.decode(logits, n, params, GenerationStats()))
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / (new_tokens - 1) * 1e3
    if profile:
        trace = None
        if trace_dir:  # a file name of letters, digits, '-' and '_' only
            os.makedirs(trace_dir, exist_ok=True)
            trace = os.path.join(trace_dir, re.sub(r"[^A-Za-z0-9-]", "_", policy) + f"-{n}.json")
        table = profile_table(engine, logits, n, profile_rows, trace, profile_graph)
        print(table, flush=True)
        if profile_path:
            with open(profile_path, "a") as f:
                f.write(f"{policy} at {n} tokens\n{table}\n")
    mem = engine.kv.memory_bytes()
    row = {"policy": policy, "context": n, "batch": batch, "ms_per_token": ms,
           "tokens_per_s": batch * 1e3 / ms,
           "kv_gpu_gib": mem.get("gpu", 0) / GiB, "kv_host_gib": mem.get("host", 0) / GiB,
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / GiB,
           "planned_peak_gpu_gib": predicted and predicted.peak("gpu", runtime=False) / GiB,
           "fill_s": fill_s}
    if ann is not None:  # host search + re-rank per token, and who served the layer-steps
        row["host_search_ms"] = ann.search_s / (new_tokens - 1) * 1e3
        row["served"] = dict(ann.served)
        print(f"  ANN: index build + fill {fill_s:.0f} s, host search + re-rank "
              f"{row['host_search_ms']:.1f} ms/token, layer-steps served {ann.served}",
              flush=True)
    del llm, engine
    free_device()
    return row


def profile_table(engine, logits: torch.Tensor, n: int, rows: int = 30,
                  trace: str | None = None, graph: bool = False) -> str:
    """GPU time by kernel over 3 decode steps: where a step's time goes (and their
    timeline as a Chrome trace at `trace`: which kernels of which streams overlap).
    Eager steps by default; `graph` profiles the CUDA graph's replays, as timed (in eager
    steps the launches, not the GPU, set the pace, so streams overlap differently)."""
    from torch.profiler import ProfilerActivity, profile

    use_graph = engine.runner.use_graph
    engine.runner.use_graph = use_graph and graph
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        list(engine.decode(logits, n, params, GenerationStats()))
        torch.cuda.synchronize()
    engine.runner.use_graph = use_graph
    if trace:
        prof.export_chrome_trace(trace)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def LLM_spec(shape: str):  # noqa: N802
    from retrieval_attn.model.spec import named_shape

    return named_shape(shape)


def _full_offload_llm(cfg: EngineConfig) -> LLM:
    """An engine whose policy streams the whole cache from pinned host memory each step."""
    small = cfg.replace(runtime={"max_context_tokens": 16})
    llm = LLM(config=small)
    spec = llm.loaded.spec
    n = cfg.runtime.max_context_tokens
    kv = FullOffloadKV(spec.num_layers, spec.num_kv_heads, n, spec.head_dim,
                       llm.device, llm.dtype, cfg.runtime.max_batch)
    llm.engine.kv = llm.engine.runner.kv = kv
    llm.engine.max_tokens = n
    runner = llm.engine.runner
    runner.batch = cfg.runtime.max_batch
    runner.static_ids = torch.zeros(runner.batch, 1, dtype=torch.long, device=llm.device)
    llm.loaded.model.setup_rope(n)
    return llm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="retrieval-attn bench",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--shape", default="qwen2.5-7b-1m")
    p.add_argument("--contexts", type=int, nargs="+", default=[131072, 1048576])
    p.add_argument("--policies", nargs="*", default=["retrieval", "dense", "full-offload"],
                   help="retrieval, retrieval-notail (kv.tail_estimate off), retrieval-ann "
                        "(host attention-aware graphs: built here, minutes per 128K), "
                        "dense, full-offload; none: only --gathers. A retrieval policy takes "
                        "overrides: retrieval:sketch=int4,rank=128,rerank=2,block=4,passes=2,"
                        "final=blocks (kv.rerank_blocks; final=positions is the default),"
                        " host=int8 (kv.host_dtype), ahead=2 (kv.lookahead_from), "
                        "store=device (kv.store_on), sms=0.75 (kv.lookahead_sm_share)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2048)
    # defaults: the int8 rank-64 sketch the presets had until their int4 one (sketch=int4;
    # kept, so that docs/results.md's earlier commands still time what they timed)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--sketch-dtype", default="int8", choices=["auto", "int8", "int4"])
    p.add_argument("--select-block", type=int, default=1,
                   help="kv.select_block (the 1m-single-gpu preset is "
                        "retrieval:block=4,ahead=3,host=int8,sketch=int4)")
    p.add_argument("--profile", nargs="*", default=[], help="policies to profile (per kernel)")
    p.add_argument("--profile-out", default=None, help="append profile tables to this file")
    p.add_argument("--profile-rows", type=int, default=30, help="kernels each profile lists")
    p.add_argument("--profile-trace", default=None,
                   help="folder for each profile's Chrome trace (a timeline of the kernels)")
    p.add_argument("--profile-graph", action="store_true",
                   help="profile the CUDA graph's replays (as timed), not eager steps")
    p.add_argument("--rerank-factor", type=int, default=2)
    p.add_argument("--batches", nargs="+", default=["1"],
                   help="sequences decoded together: numbers, or max (planner's largest)")
    p.add_argument("--json", default=None)
    p.add_argument("--gathers", action="store_true",
                   help="first time the host gathers alone at each context")
    p.add_argument("--topk", action="store_true",
                   help="first time the candidate top-k (block sums, in stages) against "
                        "torch.topk at each context")
    p.add_argument("--scores", action="store_true",
                   help="first time the sketch scoring pass (select_scores) under launch "
                        "variants at each context, one and two passes")
    p.add_argument("--tail", action="store_true",
                   help="first time the tail estimate's kernels under launch variants at "
                        "each context")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise RetrievalAttnError("bench times decode on a GPU and this machine has no CUDA "
                                 "device: run it where one is (CPU speed is not the target)")
    if args.gathers:
        for n in args.contexts:
            g = bench_gathers(args.shape, n, args.top_k * args.rerank_factor, args.top_k)
            print("gathers, µs/call: " + "  ".join(
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in g.items()),
                flush=True)
    if args.topk:
        for n in args.contexts:
            k = args.top_k * args.rerank_factor
            t = bench_topk(args.shape, n, k, args.select_block)
            print(f"candidate top-k, {k // args.select_block} of {n // args.select_block} "
                  f"block sums, µs/call: " + "  ".join(
                      f"{name} {v:.2f}" if "same" in name else f"{name} {v:.1f}"
                      for name, v in t.items() if name != "context")
                  + f"  (ours {t['torch.topk'] / t['ours']:.2f}x torch.topk's speed)",
                  flush=True)
    if args.scores:
        for n in args.contexts:
            print(f"select_scores at {n} tokens, rank {args.rank} {args.sketch_dtype}, blocks "
                  f"of {args.select_block}, µs/call (one layer):", flush=True)
            for r in bench_scores(args.shape, n, args.rank, args.sketch_dtype,
                                  args.select_block):
                print(f"  {r['variant']:<26} passes {r['passes']}  {r['us']:8.1f} µs  "
                      f"{r['GB/s']:7.0f} GB/s  max diff {r['max diff']:.2e}", flush=True)
    if args.tail:
        for n in args.contexts:
            print(f"tail estimate at {n} tokens, µs/call (one layer):", flush=True)
            for r in bench_tail(args.shape, n, args.top_k):
                print(f"  {r['variant']:<16} {r['us']:8.1f} µs  {r['GB/s']:7.0f} GB/s of V "
                      f"sums  max diff {r['max diff']:.2e}", flush=True)

    def one(policy: str, n: int, batch: str) -> dict:
        b = (int(batch) if batch != "max" else
             largest_batch_here(args.shape, policy, n, args.new_tokens, args.top_k, args.rank,
                                args.sketch_dtype, args.select_block))
        if b < 1:
            raise RetrievalAttnError(f"no batch of {policy} fits at {n} tokens")
        print(f"{policy} at {n} tokens, batch {b}", flush=True)
        return run_one(args.shape, policy, n, args.new_tokens, args.top_k, args.rank,
                       policy in args.profile, args.rerank_factor, args.sketch_dtype,
                       args.profile_out, b, args.select_block, args.profile_rows,
                       args.profile_trace, args.profile_graph)

    rows = []
    for batch in args.batches:
        rows += run_grid(args.contexts, args.policies,
                         lambda policy, n, batch=batch: one(policy, n, batch))
    print(f"\n{args.shape}, random weights, synthetic prompt K/V, top_k {args.top_k}, "
          f"window 512 + 4 sinks, rank {args.rank} {args.sketch_dtype} sketch, rerank "
          f"x{args.rerank_factor}, blocks of {args.select_block} (a policy's overrides aside), "
          f"{torch.cuda.get_device_name()}")
    width = max([13] + [len(p) + 1 for p in args.policies])
    print(f"{'context':>9} {'policy':<{width}}{'batch':>6}{'ms/token':>9}{'tok/s':>8}"
          f"{'vs dense':>9}{'vs offload':>11}{'KV GPU GiB':>11}{'KV host':>8}{'peak GPU':>9}"
          f"{'planned':>8}")
    for i, r in enumerate(rows):
        if "error" in r:
            print(f"{r['context']:>9} {r['policy']:<{width}}  {r['error'][:70]}")
            continue
        # ratios of time per generated token (1 / tok/s) against the baselines of the same
        # context and --batches item (at batch 1: of ms/token)
        group = rows[i - i % len(args.policies):][:len(args.policies)]
        same = {x["policy"]: x for x in group if x["context"] == r["context"]
                and "error" not in x}
        ratio = {b: (f"{same[b]['tokens_per_s'] / r['tokens_per_s']:.2f}" if b in same
                     else "-") for b in ("dense", "full-offload")}  # time per token
        print(f"{r['context']:>9} {r['policy']:<{width}}{r['batch']:>6}{r['ms_per_token']:>9.2f}"
              f"{r['tokens_per_s']:>8.1f}{ratio['dense']:>9}{ratio['full-offload']:>11}"
              f"{r['kv_gpu_gib']:>11.2f}{r['kv_host_gib']:>8.1f}{r['peak_gpu_gib']:>9.1f}"
              f"{_num(r['planned_peak_gpu_gib']):>8}")
    write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

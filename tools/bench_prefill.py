"""Prefill tokens/s and peak GPU memory, ours (retrieval: host offload + low-rank factors)
vs dense, with the planner's prediction beside each measurement, same run.

Random weights of a real shape and random prompt ids: a real layer-major chunked prefill.

    python -m retrieval_attn.tools.bench_prefill --shape qwen2.5-7b-1m --contexts 131072 262144
"""

from __future__ import annotations

import argparse

import torch

from retrieval_attn import LLM, EngineConfig, SamplingParams
from retrieval_attn.model.spec import named_shape
from retrieval_attn.planner import plan_memory
from retrieval_attn.tools.bench_grid import free_device, run_grid, write_json

GiB = 1 << 30


def run_one(shape: str, policy: str, n: int, chunk: int, rank: int) -> dict:
    cfg = EngineConfig.load("default").replace(
        model={"path": f"random:{shape}"},
        runtime={"device": "cuda", "dtype": "bfloat16", "max_context_tokens": n + 8,
                 "prefill_chunk_tokens": chunk, "progress_bar": False},
        kv={"policy": policy, "top_k": 2048, "rank": rank})
    plan = plan_memory(named_shape(shape), cfg, "cuda", prompt_tokens=n)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    llm = LLM(config=cfg)
    ids = torch.randint(0, llm.loaded.spec.vocab_size, (n,)).tolist()
    llm.generate({"prompt_token_ids": ids[:4096]}, SamplingParams(max_tokens=1))  # warm-up
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=2))[0]
    row = {"policy": policy, "context": n, "prefill_tok_s": out.timings.prefill_tokens_per_s,
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / GiB,
           "planned_peak_gpu_gib": plan.peak("gpu", runtime=False) / GiB,
           "kv_gpu_gib": llm.engine.kv.memory_bytes().get("gpu", 0) / GiB}
    del llm
    free_device()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2.5-7b-1m")
    p.add_argument("--contexts", type=int, nargs="+", default=[131072, 262144])
    p.add_argument("--policies", nargs="+", default=["dense", "retrieval"])
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = run_grid(args.contexts, args.policies,
                    lambda policy, n: run_one(args.shape, policy, n, args.chunk, args.rank))
    print(f"\n{args.shape}, random weights, chunk {args.chunk}, {torch.cuda.get_device_name()}")
    print(f"{'context':>9} {'policy':<10}{'prefill tok/s':>14}{'vs dense':>9}"
          f"{'peak GPU GiB':>13}{'planned':>8}{'error':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['context']:>9} {r['policy']:<10}  {r['error'][:80]}")
            continue
        dense = next((x for x in rows if x["context"] == r["context"]
                      and x["policy"] == "dense" and "error" not in x), None)
        ratio = f"{r['prefill_tok_s'] / dense['prefill_tok_s']:.2f}" if dense else "-"
        err = (r["planned_peak_gpu_gib"] - r["peak_gpu_gib"]) / r["peak_gpu_gib"]
        print(f"{r['context']:>9} {r['policy']:<10}{r['prefill_tok_s']:>14.0f}{ratio:>9}"
              f"{r['peak_gpu_gib']:>13.1f}{r['planned_peak_gpu_gib']:>8.1f}{err:>+7.0%}")
    write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""KV state memory and decode speed of every KV policy on one long prompt, same run.

Memory is what each policy's accounting reports (device: window + low-rank sketch or page
bounds, or the whole dense cache; host: the full K, V store), at the configured capacity
(max_context_tokens). Greedy tokens are compared with the dense run.

    python -m retrieval_attn.tools.bench_policies --prompt-tokens 8000 --top-k 0.05
"""

from __future__ import annotations

import argparse
import json

import torch

from retrieval_attn import LLM, SamplingParams
from retrieval_attn.tools.niah import haystack_text

MB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--config", default="default")
    p.add_argument("--prompt-tokens", type=int, default=8000)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--policies", nargs="+", default=["dense", "streaming", "quest", "retrieval"])
    p.add_argument("--top-k", type=float, default=0.05, help="share (<1) or tokens (>=1)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    top_k: int | float = int(args.top_k) if args.top_k >= 1 else args.top_k
    rows, dense_tokens, ids = [], None, None
    for policy in args.policies:
        base = LLM(args.model, config=args.config) if ids is None else None
        if ids is None:
            ids = base.tokenizer.encode(haystack_text(args.prompt_tokens * 8))
            ids = ids[:args.prompt_tokens]
            del base
        cfg = {"runtime": {"max_context_tokens": len(ids) + args.new_tokens + 1,
                           "progress_bar": False},
               "kv": {"policy": policy, "top_k": top_k}}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        llm = LLM(args.model, config=llm_config(args.config, cfg))
        params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
        llm.generate({"prompt_token_ids": ids[:64]}, SamplingParams(max_tokens=4))  # warm-up
        out = llm.generate({"prompt_token_ids": ids}, params)[0]
        mem = llm.engine.kv.memory_bytes()
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        if policy == "dense":
            dense_tokens = out.token_ids
        same = None if dense_tokens is None else next(
            (i for i, (a, b) in enumerate(zip(out.token_ids, dense_tokens, strict=False))
             if a != b), len(out.token_ids))
        rows.append({"policy": policy, "decode_tok_s": out.timings.decode_tokens_per_s,
                     "prefill_tok_s": out.timings.prefill_tokens_per_s,
                     "kv_gpu_mb": mem.get("gpu", 0) / MB, "kv_host_mb": mem.get("host", 0) / MB,
                     "peak_gpu_mb": peak / MB, "same_as_dense": same})
        del llm
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{len(ids)}-token prompt, {args.new_tokens} new tokens, top_k {args.top_k:g}, "
          f"{device}; KV MB at capacity {len(ids) + args.new_tokens + 1} tokens")
    print(f"{'policy':<11}{'KV GPU MB':>10}{'x dense':>8}{'KV host MB':>11}{'peak GPU MB':>12}"
          f"{'decode tok/s':>13}{'prefill tok/s':>14}{'= dense':>8}")
    dense_gpu = next((r["kv_gpu_mb"] for r in rows if r["policy"] == "dense"), None)
    for r in rows:
        ratio = f"{r['kv_gpu_mb'] / dense_gpu:.3f}" if dense_gpu else "-"
        print(f"{r['policy']:<11}{r['kv_gpu_mb']:>10.1f}{ratio:>8}{r['kv_host_mb']:>11.1f}"
              f"{r['peak_gpu_mb']:>12.1f}{r['decode_tok_s']:>13.1f}{r['prefill_tok_s']:>14.0f}"
              f"{r['same_as_dense']!s:>8}")
    print("= dense: greedy tokens identical to the dense run before the first difference")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def llm_config(preset: str, overrides: dict) -> object:
    from retrieval_attn import EngineConfig

    return EngineConfig.load(preset).replace(**overrides)


if __name__ == "__main__":
    raise SystemExit(main())

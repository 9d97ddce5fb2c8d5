"""Decode speed of our engine vs HF transformers `generate`, same GPU, same weights, same run.

Also checks that greedy tokens of the GPU run (bf16) match a CPU fp32 run of our engine.
Prints one table; tokens/s = (new tokens - 1) / (time of all new tokens - time of the first),
so prefill is excluded on both sides.

    python -m retrieval_attn.tools.bench_generate --prompt-tokens 512 --new-tokens 256
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from retrieval_attn import LLM, SamplingParams
from retrieval_attn.tools.niah import haystack_text


def ours_decode_tps(llm: LLM, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=8, ignore_eos=True))
    out = llm.generate({"prompt_token_ids": ids}, params)[0]
    return out.timings.decode_tokens_per_s, out.token_ids


def hf_decode_tps(llm: LLM, ids: list[int], new_tokens: int, dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llm.loaded.checkpoint_dir, dtype=dtype)
    hf = hf.to("cuda").eval()
    x = torch.tensor([ids], device="cuda")

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(8)  # warm-up
    first, full = min(timed(1) for _ in range(3)), timed(new_tokens)
    return (new_tokens - 1) / (full - first)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: embedded SmolLM2)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--check-tokens", type=int, default=32,
                   help="greedy tokens compared between GPU bf16 and CPU fp32")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA device")

    gpu = LLM(args.model, config={"runtime": {"device": "cuda", "dtype": "bfloat16"}})
    ids = gpu.tokenizer.encode(haystack_text(args.prompt_tokens * 8))[:args.prompt_tokens]
    eager = LLM(args.model, config={"runtime": {"device": "cuda", "dtype": "bfloat16",
                                                "cuda_graphs": False}})
    ours, gpu_tokens = ours_decode_tps(gpu, ids, args.new_tokens)
    ours_eager, _ = ours_decode_tps(eager, ids, args.new_tokens)
    del eager
    hf = hf_decode_tps(gpu, ids, args.new_tokens, torch.bfloat16)

    cpu = LLM(args.model, config="cpu-small")
    cpu_tokens = cpu.generate({"prompt_token_ids": ids},
                              SamplingParams(max_tokens=args.check_tokens, ignore_eos=True))[0]
    same = next((i for i, (a, b) in enumerate(zip(gpu_tokens, cpu_tokens.token_ids, strict=False))
                 if a != b), args.check_tokens)

    rows = [("ours, CUDA graph", ours), ("ours, eager", ours_eager), ("HF generate", hf)]
    print(f"\ndecode, batch 1, prompt {len(ids)} tokens, {args.new_tokens} new tokens, "
          f"{torch.cuda.get_device_name()}, bf16")
    print(f"{'engine':<20}{'tokens/s':>10}{'vs HF':>8}")
    for name, tps in rows:
        print(f"{name:<20}{tps:>10.1f}{tps / hf:>7.2f}x")
    print(f"greedy tokens equal to the CPU fp32 run: first {same} of {args.check_tokens}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": dict(rows), "same_greedy_prefix": same,
                       "gpu_tokens": gpu_tokens[:args.check_tokens],
                       "cpu_tokens": cpu_tokens.token_ids}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""retrieval-attn plan: the memory of every part of a run, and the best config that fits.

  retrieval-attn plan --model qwen2.5-7b-1m --context 1048576 --gpu-mem 80GiB --host-mem 128GiB
  retrieval-attn plan --config 1m-single-gpu --gpu-mem 80GiB --host-mem 128GiB

With --config, plans that config as it is (--model, --context override it) and checks it;
otherwise searches for the config of best expected quality that fits and prints it
(--write saves it as a YAML preset). Nothing is allocated and no weights are read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from retrieval_attn.config import KV_POLICIES, EngineConfig
from retrieval_attn.engine.engine import check_for_model
from retrieval_attn.errors import ConfigError, RetrievalAttnError
from retrieval_attn.model.spec import NAMED_SHAPES
from retrieval_attn.planner import (
    SEARCH_CHUNK_TOKENS,
    check_budget,
    format_bytes,
    largest_batch,
    parse_bytes,
    plan_memory,
    search_config,
    spec_for,
    to_yaml,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="retrieval-attn plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help=f"a shape ({', '.join(NAMED_SHAPES)}), random:<shape>, a HF checkpoint "
                        "dir or a .gguf file (default: the config's model)")
    p.add_argument("--config", default=None, help="plan this preset or YAML instead of searching")
    p.add_argument("--context", type=int, default=None,
                   help="runtime.max_context_tokens: prompt + new tokens")
    p.add_argument("--gpu-mem", default=None, help="GPU memory, e.g. 80GiB (cuda only)")
    p.add_argument("--host-mem", required=True, help="host memory, e.g. 128GiB")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="plan for this device (default: the config's, or cuda)")
    p.add_argument("--dtype", default="auto", help="runtime.dtype when searching")
    p.add_argument("--policy", choices=KV_POLICIES, default=None,
                   help="search this kv.policy only (default: dense if it fits, else retrieval)")
    p.add_argument("--top-k", type=int, default=2048, help="kv.top_k tokens when searching")
    p.add_argument("--window", type=int, default=512, help="kv.window_tokens when searching")
    p.add_argument("--sinks", type=int, default=4, help="kv.sink_tokens when searching")
    p.add_argument("--max-rank", type=int, default=None,
                   help="largest kv.rank to consider (default: head_dim; sketches are also "
                        "capped at half the bytes of the dense keys)")
    p.add_argument("--max-kv-gpu-mem", default=None,
                   help="cap on the KV state on the GPU, e.g. 12GB (bounds decode reads)")
    p.add_argument("--chunk", type=int, default=SEARCH_CHUNK_TOKENS,
                   help="largest runtime.prefill_chunk_tokens to consider")
    p.add_argument("--no-tail-estimate", action="store_true",
                   help="kv.tail_estimate false when searching (it costs decode time: "
                        "docs/results.md; the long-context presets keep it)")
    p.add_argument("--rerank-factor", type=int, default=4,
                   help="kv.rerank_factor when searching (memory barely depends on it)")
    p.add_argument("--select-block", type=int, default=1,
                   help="kv.select_block when searching: positions per selected run")
    p.add_argument("--host-dtype", default="auto", choices=["auto", "int8"],
                   help="kv.host_dtype when searching: int8 halves the host K,V store")
    p.add_argument("--store-on", default="host", choices=["host", "device", "auto"],
                   help="kv.store_on when searching: auto moves the K,V store onto the "
                        "device where the best config still fits there (faster decode)")
    p.add_argument("--lookahead-from", type=int, default=0,
                   help="kv.lookahead_from when searching (0: off)")
    p.add_argument("--batch", type=int, default=None,
                   help="runtime.max_batch: sequences decoded together (default: the "
                        "config's, or 1 when searching)")
    p.add_argument("--write", type=Path, default=None, help="write the config to this YAML")
    args = p.parse_args(argv)
    _check_flags(args)

    if args.config is not None:
        cfg = EngineConfig.load(args.config)
        overrides = {}
        if args.model is not None:
            overrides["model"] = {"path": _model_path(args.model)}
        if args.context is not None:
            overrides["runtime"] = {"max_context_tokens": args.context}
        cfg = cfg.replace(**overrides) if overrides else cfg
        device = args.device or ("cpu" if cfg.runtime.device == "cpu" else "cuda")
    else:
        if args.model is None or args.context is None:
            raise ConfigError("plan: give --model and --context to search for a config, or "
                              "--config to check one")
        device = args.device or "cuda"
    if device == "cuda" and args.gpu_mem is None:
        raise ConfigError("plan: --gpu-mem is needed for a cuda plan, e.g. --gpu-mem 80GiB")
    gpu, host = parse_bytes(args.gpu_mem or 0), parse_bytes(args.host_mem)

    if args.config is None:
        path = _model_path(args.model)
        spec = spec_for(path)
        if args.lookahead_from:  # the searched configs all have it: refuse it once, here
            check_for_model(EngineConfig.from_dict(
                {"kv": {"lookahead_from": args.lookahead_from}}), spec, path)
        cfg = search_config(
            spec, args.context, gpu, host, device_type=device, model_path=path,
            policy=args.policy, dtype=args.dtype, top_k=args.top_k, window_tokens=args.window,
            sink_tokens=args.sinks, max_rank=args.max_rank, prefill_chunk_tokens=args.chunk,
            tail_estimate=not args.no_tail_estimate, rerank_factor=args.rerank_factor,
            select_block=args.select_block, host_dtype=args.host_dtype,
            lookahead_from=args.lookahead_from, store_on=args.store_on,
            max_kv_gpu_bytes=None if args.max_kv_gpu_mem is None
            else parse_bytes(args.max_kv_gpu_mem))
    else:
        spec = spec_for(cfg.model.path, cfg.model.cache_dir)
    check_for_model(cfg, spec, str(cfg.model.path or "the embedded model"))
    if args.batch is not None:
        cfg = cfg.replace(runtime={"max_batch": args.batch})
    plan = plan_memory(spec, cfg, device)
    print(plan.table())
    print(f"\nbudget: gpu {format_bytes(gpu)}, host {format_bytes(host)}")
    check_budget(plan, gpu, host)
    print(f"largest runtime.max_batch that fits this budget: "
          f"{largest_batch(spec, cfg, gpu, host, device)}")
    summary = (f"planned for gpu {format_bytes(gpu)}, host {format_bytes(host)} ({device}): "
               f"peak gpu {format_bytes(plan.peak('gpu'))}, host "
               f"{format_bytes(plan.peak('host'))}; KV state on the gpu "
               f"{format_bytes(plan.kv_bytes('gpu'))}")
    text = to_yaml(cfg, header=f"retrieval-attn plan: {summary}")
    print(f"\nconfig ({summary}):\n{text}", end="")
    if args.write is not None:
        try:
            args.write.write_text(text)
        except OSError as e:
            raise ConfigError(f"plan: cannot write --write {args.write}: {e.strerror or e}; "
                              "give a file path in a folder you can write to") from None
        print(f"wrote {args.write}")
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse impossible flags before any model is read or config searched."""
    for flag, value in (("--chunk", args.chunk), ("--max-rank", args.max_rank),
                        ("--top-k", args.top_k), ("--rerank-factor", args.rerank_factor),
                        ("--select-block", args.select_block), ("--batch", args.batch),
                        ("--context", args.context)):
        if value is not None and value < 1:
            raise ConfigError(f"plan: {flag} is {value}: it must be a positive number")
    if args.lookahead_from < 0:
        raise ConfigError(f"plan: --lookahead-from is {args.lookahead_from}: use 0 (off) or "
                          "the first layer to look ahead for (1 or more)")
    if args.write is not None:
        folder = args.write.parent
        if args.write.is_dir():
            raise ConfigError(f"plan: --write {args.write} is a folder: give a YAML file path, "
                              f"e.g. {args.write / 'plan.yaml'}")
        if not folder.is_dir():
            raise ConfigError(f"plan: --write {args.write}: the folder {folder} does not "
                              "exist; create it first or write elsewhere")


def _model_path(model: str) -> str:
    return f"random:{model}" if model in NAMED_SHAPES else model


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RetrievalAttnError as e:  # as the retrieval-attn CLI does: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

"""Planned vs measured memory of a config: GPU peak (torch.cuda.max_memory_allocated) and
host peak (process RSS), over a real prefill of a random prompt and a few decode tokens.

    python -m retrieval_attn.tools.check_plan --config cpu-small
    python -m retrieval_attn.tools.check_plan --config 1m-single-gpu --layers 1

--layers K stops a layer-major prefill (kv.policy retrieval) after its first K layers and
skips decode. The prefill's peak is reached in its first layer: the weights, host store
and low-rank keys exist from the start, and every later layer reuses the same buffers
(the prompt's hidden states, one layer's K, V scratch, a chunk's activations). A 1M-token
prefill of the Qwen2.5-7B-1M shape takes ~15 minutes on an H100, its first layer ~40 s.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from retrieval_attn import LLM, EngineConfig, SamplingParams
from retrieval_attn.engine import GenerationStats
from retrieval_attn.errors import ConfigError
from retrieval_attn.planner import plan_memory

GiB = 1 << 30


class _Stopped(Exception):
    """Raised after the last layer --layers asked for (the rest is not needed)."""


def _stop_after(kv, layers: int) -> None:
    if not getattr(kv, "layer_major", False):
        raise ConfigError(f"--layers needs a layer-major prefill (kv.policy retrieval or "
                          f"another host-offload policy); {type(kv).__name__} prefills "
                          "chunk-major: drop --layers to run the whole prefill")
    finish = kv.finish_layer

    def finish_then_stop(layer: int, n: int) -> None:
        finish(layer, n)
        if layer + 1 >= layers:
            raise _Stopped

    kv.finish_layer = finish_then_stop


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM, the high-water mark of its own memory map. Not
    getrusage's ru_maxrss, which Linux carries across exec: a process started from a big
    parent (pytest, a notebook) would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB


def measure(config: str, new_tokens: int = 8, layers: int = 0,
            prompt_tokens: int | None = None) -> dict:
    """Run `config` (a preset name or YAML path) and return planned vs measured peaks."""
    cfg = EngineConfig.load(config).replace(runtime={"progress_bar": False})
    n = prompt_tokens or cfg.runtime.max_context_tokens - new_tokens
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    llm = LLM(config=cfg)
    cuda = llm.device.type == "cuda"
    spec = llm.loaded.spec
    plan = plan_memory(spec, cfg, llm.device.type, prompt_tokens=n)  # as LLM(...) plans
    if layers:
        _stop_after(llm.engine.kv, layers)
    ids = torch.randint(0, spec.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    stats, t0 = GenerationStats(), time.perf_counter()
    try:
        list(llm.engine.generate_ids(ids.tolist(), SamplingParams(max_tokens=new_tokens,
                                                                  ignore_eos=True), stats))
    except _Stopped:
        pass
    row = {"config": str(config), "device": torch.cuda.get_device_name() if cuda else "cpu",
           "prompt_tokens": n, "layers_run": layers or spec.num_layers,
           "decoded": 0 if layers else new_tokens, "seconds": time.perf_counter() - t0,
           "planned_host_gib": plan.peak("host") / GiB,
           "measured_host_gib": peak_rss_bytes() / GiB}
    if cuda:
        row.update(planned_gpu_gib=plan.peak("gpu", runtime=False) / GiB,
                   measured_gpu_gib=torch.cuda.max_memory_allocated() / GiB)
    return row


def table(row: dict) -> str:
    lines = [f"{row['config']} on {row['device']}: prompt {row['prompt_tokens']} tokens, "
             f"{row['layers_run']} layers prefilled, {row['decoded']} tokens decoded, "
             f"{row['seconds']:.0f} s",
             f"{'memory':<28}{'planned GiB':>12}{'measured GiB':>13}{'error':>7}"]
    for place, what in (("gpu", "GPU (max_memory_allocated)"), ("host", "host (peak RSS)")):
        if f"planned_{place}_gib" in row:
            p, m = row[f"planned_{place}_gib"], row[f"measured_{place}_gib"]
            lines.append(f"{what:<28}{p:>12.1f}{m:>13.1f}{(p - m) / m:>+7.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="retrieval-attn check-plan",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--config", nargs="+", default=["cpu-small"],
                   help="preset names or YAML paths, each run in turn in this process: "
                        "give one per process for clean peaks")
    p.add_argument("--new-tokens", type=int, default=8,
                   help="decoded after the prompt; the prompt fills the rest of "
                        "runtime.max_context_tokens")
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--layers", type=int, default=0,
                   help="stop a layer-major prefill after this many layers (0: all + decode)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    for config in args.config:
        rows.append(measure(config, args.new_tokens, args.layers, args.prompt_tokens))
        print(table(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

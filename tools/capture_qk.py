"""Capture real post-RoPE queries and keys of the embedded model on a haystack prompt.

The prompt is the shipped haystack text cut to exactly N tokens. A recording KV policy
wraps the engine's DenseKV: it forwards every call and keeps q of the chosen layers,
both for prefill (all prompt positions) and for the greedy decode steps that follow
(the held-out queries of the ANN study). Keys are the prompt's N keys from the dense cache.

Writes, per layer l, under --out/n{N}/:
  layer{l}.npz  q_prefill [H, N, D], q_decode [H, S, D], k [Hkv, N, D]  (float16)
  meta.json     model shape, N, decode steps, generated text

    python -m retrieval_attn.tools.capture_qk --tokens 8100 --out out/qk
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from retrieval_attn import LLM, SamplingParams
from retrieval_attn.engine.engine import GenerationStats
from retrieval_attn.tools.niah import haystack_text

LOG = logging.getLogger(__name__)


class RecordingKV:
    """Forwards to a KV policy and keeps q [H, T, D] (float16, on the host) of some layers."""

    def __init__(self, inner, layers: list[int]) -> None:
        self.inner, self.layers = inner, set(layers)
        self.graph_safe = False
        self.prefill: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        self.decode: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def __getattr__(self, name):  # start_request, finish_layer, memory_bytes, ...
        return getattr(self.inner, name)

    def attend(self, layer, q, k, v, step):
        if layer in self.layers:
            kept = q[0].detach().to("cpu", torch.float16)  # [H, T, D]
            (self.decode if q.shape[2] == 1 else self.prefill)[layer].append(kept)
        return self.inner.attend(layer, q, k, v, step)


def haystack_ids(llm: LLM, n: int) -> list[int]:
    """Exactly n token ids of the haystack text."""
    ids = llm.tokenizer.encode(haystack_text(min_chars=n * 6))
    while len(ids) < n:
        ids = llm.tokenizer.encode(haystack_text(min_chars=len(ids) * 12))
    return ids[:n]


def capture(n: int, layers: list[int], decode_tokens: int, out: Path,
            chunk_tokens: int, device: str = "cpu") -> Path:
    cfg = {"runtime": {"device": device, "dtype": "float32", "cuda_graphs": False,
                       "max_context_tokens": n + decode_tokens + 1,
                       "prefill_chunk_tokens": chunk_tokens, "progress_bar": True},
           "kv": {"policy": "dense"}}
    llm = LLM(config=cfg)
    ids = haystack_ids(llm, n)
    spec = llm.loaded.spec
    bad = [x for x in layers if not 0 <= x < spec.num_layers]
    if bad:
        raise SystemExit(f"--layers {bad} outside [0, {spec.num_layers})")
    dense = llm.engine.kv
    rec = RecordingKV(dense, layers)
    llm.engine.runner.kv = rec
    stats = GenerationStats()
    params = SamplingParams(max_tokens=decode_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    new_ids = list(llm.engine.generate_ids(ids, params, stats))
    LOG.info("prefill %.1f s, decode %.1f s", stats.prefill_s, stats.decode_s)
    folder = out / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        q_pre = torch.cat(rec.prefill[layer], dim=1)  # [H, N, D]
        q_dec = torch.cat(rec.decode[layer], dim=1)  # [H, S, D]
        k = dense.k[layer, 0, :, :n].to("cpu", torch.float16)  # [Hkv, N, D]
        assert q_pre.shape[1] == n and k.shape[1] == n, (q_pre.shape, k.shape)
        np.savez(folder / f"layer{layer}.npz", q_prefill=q_pre.numpy(),
                 q_decode=q_dec.numpy(), k=k.numpy())
    meta = {"tokens": n, "layers": layers, "decode_tokens": len(new_ids),
            "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "seconds": round(time.perf_counter() - t0, 1),
            "text": llm.tokenizer.decode(new_ids)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8100, 32768],
                   help="prompt lengths N (the model is trained to 8192 positions)")
    p.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    p.add_argument("--decode-tokens", type=int, default=64, help="held-out decode queries")
    p.add_argument("--chunk-tokens", type=int, default=1024, help="prefill chunk")
    p.add_argument("--out", type=Path, default=Path("out/qk"))
    p.add_argument("--device", default="cpu", help="cpu or cuda (float32 either way)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for n in args.tokens:
        folder = capture(n, args.layers, args.decode_tokens, args.out, args.chunk_tokens,
                         args.device)
        LOG.info("wrote %s", folder)


if __name__ == "__main__":
    main()

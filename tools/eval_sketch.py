"""Recall of the true top-k by sketch rank, sketch precision and re-rank factor, on real
captured queries and keys (tools/capture_qk.py output).

For each captured layer and held-out decode query: the truth is the top-k positions of
the offloaded region [sinks, n - window) by the group's summed exact attention
probability; the low-rank retriever picks k with the window's log-sum-exp, as decode
does. Each sketch is a real LowRankKeys: float32, or int8 / int4 projected keys with
per-dim scales (kv.sketch_dtype), scored against an int8 query as the kernel scores them.
An int8 sketch of rank 2r, or an int4 one of rank 4r, takes the bytes of a bfloat16 one
of rank r.

    python -m retrieval_attn.tools.eval_sketch --qk out/qk --tokens 8100 --budget 40
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from retrieval_attn.index.retriever import LowRankRetriever
from retrieval_attn.offload.lowrank import LowRankKeys
from retrieval_attn.tools.longctx_diagnostics import _recall, _true_topk

SKETCHES = {"float32": "auto", "int8": "int8", "int4": "int4"}


def layer_recall(k: torch.Tensor, q_decode: torch.Tensor, rank: int, sketch: str,
                 factor: int, budget: int, sinks: int, window: int, stride: int = 1) -> float:
    """k [Hkv, n, D], q_decode [H, T, D] float32 -> mean recall of the true top-budget.
    sketch: float32, int8 or int4."""
    hkv, n, d = k.shape
    g = q_decode.shape[0] // hkv
    lo, hi = sinks, n - window
    keys = LowRankKeys(1, hkv, n, d, rank, torch.device("cpu"), torch.float32,
                       SKETCHES[sketch])
    keys.build(0, k)

    def exact(_layer, pos):
        return k.gather(1, pos[..., None].expand(-1, -1, d))

    # independent queries, not one decode sequence: each normalised by its own region lse
    retriever = LowRankRetriever(keys, d, factor, exact if factor > 1 else None,
                                 reuse_lse=False)
    recalls = []
    for t in range(0, q_decode.shape[1], stride):
        q = q_decode[:, t].reshape(hkv, g, d)
        logits = q @ k.transpose(1, 2) * d**-0.5  # [Hkv, G, n]
        truth = _true_topk(torch.softmax(logits, -1), lo, hi, budget)
        window_lse = torch.cat([logits[..., :lo], logits[..., hi:]], -1).logsumexp(-1)
        found = retriever.select(0, q, lo, torch.tensor([hi]), budget, window_lse)
        recalls.append(_recall(found.positions[:, :int(found.count)], truth))
    return float(np.mean(recalls))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eval_sketch", description=__doc__.splitlines()[0])
    p.add_argument("--qk", type=Path, default=Path("out/qk"), help="capture_qk.py output")
    p.add_argument("--tokens", type=int, default=8100)
    p.add_argument("--budget", type=int, default=40, help="top_k per kv head")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--sketches", nargs="+", choices=list(SKETCHES),
                   default=["float32", "int8", "int4"])
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=4, help="every stride-th decode query")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    folder = args.qk / f"n{args.tokens}"
    meta = json.loads((folder / "meta.json").read_text())
    rows = []
    for rank in args.ranks:
        for sketch in args.sketches:
            for factor in args.factors:
                per_layer = []
                for layer in meta["layers"]:
                    z = np.load(folder / f"layer{layer}.npz")
                    per_layer.append(layer_recall(
                        torch.from_numpy(z["k"]).float(), torch.from_numpy(z["q_decode"]).float(),
                        rank, sketch, factor, args.budget, args.sinks, args.window, args.stride))
                rows.append({"rank": rank, "sketch": sketch,
                             "rerank": factor, "recall": float(np.mean(per_layer)),
                             "per_layer": per_layer})
    print(f"recall of the true top-{args.budget} of {meta['tokens']} tokens (window "
          f"{args.window} + {args.sinks} sinks), layers {meta['layers']}, mean over layers")
    print(f"{'rank':>5} {'sketch':<8}{'rerank':>7}{'recall':>8}   per layer")
    for r in rows:
        print(f"{r['rank']:>5} {r['sketch']:<8}{'x' + str(r['rerank']):>7}{r['recall']:>8.3f}   "
              + " ".join(f"{x:.3f}" for x in r["per_layer"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

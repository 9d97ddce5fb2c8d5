"""Recall@k vs % of keys visited for ANN indexes over real captured queries and keys.

Reads tools/capture_qk.py output (out/qk/n{N}/layer{l}.npz). For every captured layer and
kv head: one index per kind over that head's N prompt keys; the attention-aware index is
built from a sample of prefill queries of the head's G query heads. Held-out decode
queries are searched per query head (GQA: each of the G heads of the group searches the
kv head's index on its own, as DESIGN's baselines do); truth = exact top-k inner product
over all N keys. Each index's search knob is swept (efSearch / nprobe / beam width).

Table, per index: the smallest mean % visited (over query heads, one knob for all heads)
at which the MEAN recall over heads reaches the target, and at which the WORST head
does; % visited = distances computed / N, centroids and entry points included.

    python -m retrieval_attn.tools.eval_recall --qk out/qk --tokens 8100 32768
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from retrieval_attn.index.ann import exact_topk, recall_at_k
from retrieval_attn.index.ann_retriever import build_head_index

LOG = logging.getLogger(__name__)

KNOBS = {
    "faiss-hnsw": [100, 150, 200, 300, 400, 600, 800, 1200, 1600],
    "faiss-ivf": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48],
    "hnswlib": [100, 150, 200, 300, 400, 600, 800, 1200, 1600],
    "attention-aware": [100, 120, 150, 200, 250, 300, 400, 600],
}


def build(kind: str, keys: np.ndarray, build_q: np.ndarray):
    """The index the decode path would build (index.kind "attention" is "attention-aware")."""
    return build_head_index("attention" if kind == "attention-aware" else kind, keys, build_q)


def evaluate_head(kinds: list[str], keys: np.ndarray, build_q: np.ndarray,
                  queries: list[np.ndarray], k: int, prebuilt: dict | None = None) -> dict:
    """One kv head: keys [N, D], build_q [M, D], queries G x [S, D] (held out) ->
    {kind: {"recall", "visited" [knob, G], "build_s", "bytes", "degree"}}; prebuilt
    {kind: index} uses an existing index (e.g. a saved one) instead of building."""
    n = keys.shape[0]
    truth = [exact_topk(q, keys, k)[1] for q in queries]
    out = {}
    for kind in kinds:
        idx = (prebuilt or {}).get(kind) or build(kind, keys, build_q)
        rec = np.zeros((len(KNOBS[kind]), len(queries)))
        vis = np.zeros_like(rec)
        for j, knob in enumerate(KNOBS[kind]):
            for g, (q, t) in enumerate(zip(queries, truth, strict=True)):
                _, found = idx.search(q, k, knob)
                rec[j, g] = recall_at_k(found, t).mean()
                vis[j, g] = 100.0 * idx.ndis.mean() / n
        deg = idx.degree_stats() if hasattr(idx, "degree_stats") else {}
        out[kind] = {"recall": rec, "visited": vis, "build_s": idx.build_s,
                     "bytes": sum(idx.nbytes().values()), "degree": deg}
    return out


def eval_length(folder: Path, kinds: list[str], k: int, n_build: int, n_decode: int,
                seed: int) -> dict:
    """-> {kind: {"knobs", "recall" [knob, head], "visited" [knob, head], build_s, bytes}}."""
    meta = json.loads((folder / "meta.json").read_text())
    G = meta["num_heads"] // meta["num_kv_heads"]
    res = {kind: {"knobs": KNOBS[kind], "recall": [], "visited": [], "build_s": 0.0,
                  "bytes": 0} for kind in kinds}
    rng = np.random.default_rng(seed)
    for layer in meta["layers"]:
        z = np.load(folder / f"layer{layer}.npz")
        q_pre, q_dec, k_all = z["q_prefill"], z["q_decode"], z["k"]
        n = k_all.shape[1]
        pos = np.sort(rng.choice(n, min(n_build, n), replace=False))
        steps = np.linspace(0, q_dec.shape[1] - 1, min(n_decode, q_dec.shape[1])).astype(int)
        for h in range(k_all.shape[0]):
            keys = np.ascontiguousarray(k_all[h], dtype=np.float32)  # [N, D]
            build_q = q_pre[h * G:(h + 1) * G, pos].reshape(-1, keys.shape[1])
            queries = [q_dec[g, steps].astype(np.float32) for g in range(h * G, (h + 1) * G)]
            for kind, r in evaluate_head(kinds, keys, build_q.astype(np.float32), queries,
                                         k).items():
                res[kind]["build_s"] += r["build_s"]
                res[kind]["bytes"] += r["bytes"]
                res[kind]["recall"].append(r["recall"])
                res[kind]["visited"].append(r["visited"])
            LOG.info("N=%d layer %d kv head %d done", n, layer, h)
    for kind in kinds:
        res[kind]["recall"] = np.concatenate(res[kind]["recall"], axis=1)
        res[kind]["visited"] = np.concatenate(res[kind]["visited"], axis=1)
    return res


def first_reaching(visited: np.ndarray, recall: np.ndarray, target: float) -> str:
    """Mean % visited at the first knob where recall (per knob) >= target."""
    for v, r in zip(visited, recall, strict=True):
        if r >= target:
            return f"{v:.1f}%"
    return "never"


def table(res: dict, n: int, k: int, target: float, heads: int) -> str:
    rows = [f"N={n}: recall@{k} >= {target} over {heads} query heads (decode queries held out)",
            f"{'index':<16} {f'mean >= {target:.2f}':>12} {f'worst >= {target:.2f}':>13} "
            f"{'best mean rec':>13} {'build s':>8} {'MB':>7}"]
    for kind, r in res.items():
        vis = r["visited"].mean(axis=1)
        mean = r["recall"].mean(axis=1)
        worst = r["recall"].min(axis=1)
        rows.append(f"{kind:<16} {first_reaching(vis, mean, target):>12} "
                    f"{first_reaching(vis, worst, target):>13} {mean.max():>13.3f} "
                    f"{r['build_s']:>8.1f} {r['bytes'] / 2**20:>7.1f}")
    return "\n".join(rows)


def plot(all_res: dict, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_res), figsize=(6 * len(all_res), 4.5), squeeze=False)
    for ax, (n, res) in zip(axes[0], all_res.items(), strict=True):
        for kind, r in res.items():
            vis = r["visited"].mean(axis=1)
            line, = ax.plot(vis, r["recall"].mean(axis=1), "o-", label=f"{kind} mean")
            ax.plot(vis, r["recall"].min(axis=1), "x--", color=line.get_color(),
                    label=f"{kind} worst head")
        ax.axhline(target, color="gray", lw=0.8)
        ax.set(xscale="log", xlabel="distances computed / N keys, % (can pass 100)",
               ylabel="recall@100", title=f"N = {n}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--qk", type=Path, default=Path("out/qk"), help="capture_qk.py output")
    p.add_argument("--tokens", type=int, nargs="+", default=[8100, 32768])
    p.add_argument("--indexes", nargs="+", default=list(KNOBS), choices=list(KNOBS))
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--build-queries", type=int, default=2048,
                   help="prefill positions sampled per layer (x G query heads)")
    p.add_argument("--decode-queries", type=int, default=32,
                   help="decode steps evaluated per query head (spread over the capture)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: under --qk)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    all_res = {}
    for n in args.tokens:
        t0 = time.perf_counter()
        res = eval_length(args.qk / f"n{n}", args.indexes, args.k, args.build_queries,
                          args.decode_queries, args.seed)
        all_res[n] = res
        heads = next(iter(res.values()))["recall"].shape[1]
        print(table(res, n, args.k, args.target, heads), flush=True)
        print(f"({time.perf_counter() - t0:.0f} s)\n", flush=True)
    path = args.plot or args.qk / "recall_vs_visited.png"
    plot(all_res, path, args.target)
    LOG.info("wrote %s", path)


if __name__ == "__main__":
    main()

"""Per-layer diagnostics of a sparse KV policy against exact dense attention.

For one decode step: attention-output relative error, share of the true softmax mass on
the attended tokens, and recall of the true top-k (by the group's summed attention
probability, within the offloaded region). Also recall vs rank of the low-rank sketch, and
vs the re-rank factor.
"""

from __future__ import annotations

import torch

from retrieval_attn.config import KVConfig
from retrieval_attn.index.retriever import LowRankRetriever
from retrieval_attn.offload.lowrank import LowRankKeys
from retrieval_attn.offload.sparse import SparseKV, TraceEntry

Prompt = tuple[torch.Tensor, torch.Tensor]  # a prompt's exact K, V [L, Hkv, n, D]


def _dense(entry: TraceEntry, kv: SparseKV, exact: Prompt | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact probs [Hkv, G, n] and output [H, D] from the host store's full K, V, its
    prompt rows replaced by `exact`'s when given (an int8 store holds rounded rows)."""
    Hkv, D = kv.Hkv, kv.D
    k, v = (x.float() for x in kv.store.read(entry.layer, 0, entry.n))
    if exact is not None:
        m = min(entry.n, exact[0].shape[2])
        k[:, :m], v[:, :m] = (x[entry.layer, :, :m].float().cpu() for x in exact)
    q = entry.q.float().reshape(Hkv, -1, D).cpu()
    probs = torch.softmax(q @ k.transpose(1, 2) * D**-0.5, dim=-1)
    return probs, (probs @ v).reshape(-1, D)


def _true_topk(probs: torch.Tensor, lo: int, hi: int, k: int) -> torch.Tensor:
    mass = probs.sum(dim=1)[:, lo:hi]  # [Hkv, M]
    return mass.topk(min(k, hi - lo), dim=-1).indices + lo


def _recall(selected: torch.Tensor, truth: torch.Tensor) -> float:
    if truth.shape[1] == 0:
        return float("nan")
    hits = [len(set(s.tolist()) & set(t.tolist())) for s, t in zip(selected, truth, strict=True)]
    return sum(hits) / truth.numel()


def layer_diagnostics(entries: list[TraceEntry], kv: SparseKV, cfg: KVConfig,
                      exact: Prompt | None = None) -> dict:
    """exact: the prompt's K, V [L, Hkv, n, D] as prefilled, the reference's rows (else
    the store's)."""
    per_layer = []
    for e in entries:
        probs, ref = _dense(e, kv, exact)
        rel = ((e.out.float().cpu() - ref).norm() / ref.norm()).item()
        attended = torch.zeros(kv.Hkv, e.n, dtype=torch.bool)
        attended[:, :min(kv.window.S, e.n)] = True
        attended[:, max(0, e.n - kv.window.W):] = True
        attended.scatter_(1, e.selected.cpu(), True)
        mass = (probs * attended[:, None]).sum(-1).mean().item()
        lo, hi = kv.window.offloaded_range(e.n)
        recall = _recall(e.selected.cpu(), _true_topk(probs, lo, hi, kv.budget))
        per_layer.append({"layer": e.layer, "rel_err": rel, "mass": mass, "recall": recall})
    lines = [f"{'layer':>6}{'rel err':>10}{'mass':>8}{'recall':>8}"]
    for r in per_layer:
        lines.append(f"{r['layer']:>6}{r['rel_err']:>10.4f}{r['mass']:>8.3f}{r['recall']:>8.3f}")
    mean = {m: sum(r[m] for r in per_layer) / len(per_layer) for m in ("rel_err", "mass",
                                                                        "recall")}
    worst = max(per_layer, key=lambda r: r["rel_err"])
    lines = lines[:1] + [f"{'mean':>6}{mean['rel_err']:>10.4f}{mean['mass']:>8.3f}"
                         f"{mean['recall']:>8.3f}   (worst rel err {worst['rel_err']:.4f} "
                         f"in layer {worst['layer']})"] + lines[1:]
    return {"per_layer": per_layer, "mean": mean, "lines": lines[:2]}


def rank_recall(entries: list[TraceEntry], kv: SparseKV, cfg: KVConfig,
                ranks: tuple[int, ...] = (2, 4, 8, 16, 32, 64),
                factors: tuple[int, ...] = (2, 4, 8), exact: Prompt | None = None) -> dict:
    """Recall of the true top-k vs sketch rank: the sketch alone, and re-ranking the top
    top_k × f sketch candidates with exact keys for each re-rank factor f (the true top-k
    from `exact`'s prompt rows when given, as layer_diagnostics)."""
    ranks = tuple(r for r in ranks if r <= kv.D)
    n0 = entries[0].n - 1  # prompt length: the sketch is fitted on the prompt's keys

    def exact_keys(layer, pos):
        k = kv.store.read(layer, 0, kv.store.max_tokens)[0].float()
        return k.gather(1, pos[..., None].expand(-1, -1, kv.D))

    rows = []
    for rank in ranks:
        sketch = LowRankKeys(kv.L, kv.Hkv, entries[0].n, kv.D, rank, torch.device("cpu"),
                             torch.float32, cfg.sketch_dtype)  # the config's precision
        # one query per prompt, not a decode sequence: exact region lse (two passes)
        retrievers = {"plain": LowRankRetriever(sketch, kv.D, reuse_lse=False)}
        retrievers |= {f"x{f}": LowRankRetriever(sketch, kv.D, f, exact_keys, reuse_lse=False)
                       for f in factors}
        got = {name: [] for name in retrievers}
        for e in entries:
            k = kv.store.read(e.layer, 0, e.n)[0].float()
            sketch.build(e.layer, k)
            probs, _ = _dense(e, kv, exact)
            lo, hi = kv.window.offloaded_range(e.n)
            truth = _true_topk(probs, lo, hi, kv.budget)
            q = e.q.float().cpu().reshape(kv.Hkv, -1, kv.D)
            wlse = kv.window.lse(e.layer, e.q.reshape(kv.Hkv, -1, kv.D),
                                 torch.tensor([e.n - 1], device=e.q.device)).cpu()
            for name, retriever in retrievers.items():
                found = retriever.select(e.layer, q, lo, torch.tensor([hi]), kv.budget, wlse)
                got[name].append(_recall(found.positions[:, :int(found.count)], truth))
        rows.append({"rank": rank, **{m: sum(v) / len(v) for m, v in got.items()}})
    names = list(rows[0])[1:] if rows else []
    lines = [f"{'rank':>6}" + "".join(f"{'recall' if n == 'plain' else 'rerank ' + n:>12}"
                                      for n in names)
             + f"   (top-{kv.budget} of {n0} prompt tokens, mean over layers)"]
    lines += [f"{r['rank']:>6}" + "".join(f"{r[n]:>12.3f}" for n in names) for r in rows]
    return {"rows": rows, "lines": lines}

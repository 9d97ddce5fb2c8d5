"""Inspect a saved context's indexes: recall@k vs % of keys visited, per layer and head.

For each chosen layer and kv head of a context written by LLM.save_context: the saved
index (its kind from the manifest) and every other index kind built fresh over the same
keys, searched with the context's held-out probe queries (the last prompt positions,
never in the build sample); truth is exact top-k over the head's indexed keys. Prints one
table (the % visited where mean and worst-head recall reach the target, build seconds,
bytes, graph degree) and writes a PNG of the recall/visited curves. "% visited" is the
distances computed per query over the indexed keys, entry points, centroids and HNSW upper
levels included: it can pass 100%.

    retrieval-attn inspect ctx/ --layers 0 10 20 --k 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file

from retrieval_attn.context import ContextError, check_files, read_manifest
from retrieval_attn.errors import ConfigError
from retrieval_attn.index.ann_retriever import INDEX_CLASSES, PIP_NAMES, missing_modules
from retrieval_attn.tools.eval_recall import KNOBS, evaluate_head, first_reaching, plot

KIND_NAMES = {"attention": "attention-aware", "hybrid": "attention-aware"}


def inspect(path: Path, layers: list[int] | None, kinds: list[str], k: int) -> dict:
    """-> {"n", "rows": {kind: {recall, visited [knob, heads], build_s, bytes, degree}}}."""
    manifest = read_manifest(path)  # its layout, before any library or file is read
    spec, kv, index = manifest["spec"], manifest["kv"], manifest["index"]
    if index.get("kind") == "lowrank":
        raise ContextError(f"{path} was saved with index.kind lowrank: no host index to "
                           "inspect (save it with index.kind attention, faiss-hnsw, ...)")
    needed = [index.get("kind")] + ["attention" if kind == "attention-aware" else kind
                                    for kind in kinds]
    missing = missing_modules(needed)
    if missing:
        raise ConfigError(f"inspect needs {' and '.join(missing)} to search the indexes, not "
                          f"installed: pip install {' '.join(PIP_NAMES[m] for m in missing)} "
                          "(or retrieval-attn[index])")
    n = len(manifest["prompt_token_ids"])
    lo, hi = kv["sink_tokens"], max(kv["sink_tokens"], n + 1 - kv["window_tokens"])
    L = spec["num_layers"]
    bad = [layer for layer in layers or [] if not 0 <= layer < L]
    if bad:
        raise ContextError(f"--layers {' '.join(map(str, bad))}: the model of {path} has {L} "
                           f"layers; give layers 0 to {L - 1}")
    unsaved = [layer for layer in (layers if layers is not None else range(L))
               if f"index/layer{layer:03d}.safetensors" not in manifest["files"]]
    if unsaved:
        raise ContextError(f"{path} holds no index of layer(s) {unsaved[:8]} (saved before "
                           "they were built): pass --layers of the saved ones")
    if not 1 <= k <= (hi - lo) // 2:
        raise ContextError(f"--k is {k}, but each head of {path} indexes {hi - lo} keys: give "
                           f"--k 1 to {(hi - lo) // 2} (recall@k over more than half the keys "
                           "says nothing of an index)")
    check_files(path)
    G = spec["num_heads"] // spec["num_kv_heads"]
    keys_all = load_file(str(path / "kv.safetensors"))["k"]  # [L, Hkv, n, D]
    queries = load_np(str(path / "queries.safetensors"))
    saved_kind = KIND_NAMES.get(index["kind"], index["kind"])
    rows: dict[str, dict] = {}
    for layer in layers if layers is not None else range(spec["num_layers"]):
        states = load_np(str(path / f"index/layer{layer:03d}.safetensors"))
        build_q = queries[f"build.{layer}"].astype(np.float32)  # [Hkv, G·M, D]
        probe = queries[f"probe.{layer}"].astype(np.float32)  # [H, P, D]
        for h in range(spec["num_kv_heads"]):
            xb = np.ascontiguousarray(keys_all[layer, h, lo:hi].float().numpy())
            state = {name.split(".", 1)[1]: a for name, a in states.items()
                     if name.startswith(f"h{h}.")}
            saved = INDEX_CLASSES[index["kind"]].from_state(state, xb)
            q = [np.ascontiguousarray(probe[g]) for g in range(h * G, (h + 1) * G)]
            res = evaluate_head(kinds, xb, build_q[h], q, k, prebuilt={saved_kind: saved})
            for kind, r in res.items():
                row = rows.setdefault(kind, {"recall": [], "visited": [], "build_s": 0.0,
                                             "bytes": 0, "degree": []})
                row["recall"].append(r["recall"])
                row["visited"].append(r["visited"])
                row["build_s"] += r["build_s"]
                row["bytes"] += r["bytes"]
                if r["degree"]:
                    row["degree"].append(r["degree"])
    for row in rows.values():
        row["recall"] = np.concatenate(row["recall"], axis=1)
        row["visited"] = np.concatenate(row["visited"], axis=1)
    return {"n": hi - lo, "rows": rows, "saved": saved_kind}


def table(result: dict, k: int, target: float) -> str:
    out = [f"{result['n']} indexed keys per head; recall@{k} over "
           f"{next(iter(result['rows'].values()))['recall'].shape[1]} query heads x probe "
           f"queries; saved index: {result['saved']}",
           f"mean/worst>={target}: distances computed per query, as % of the indexed keys, "
           f"where the mean/worst head's recall first reaches {target};",
           "  entry points, centroids and HNSW upper levels count too: over 100% is more "
           "work than an exact scan",
           f"{'index':<16} {'mean>=' + str(target):>10} {'worst>=' + str(target):>11} "
           f"{'best mean':>9} {'build s':>8} {'MB':>7} {'mean deg':>8} {'no in-edge':>10}"]
    for kind, r in result["rows"].items():
        vis = r["visited"].mean(axis=1)
        deg = r["degree"]
        mean_deg = f"{np.mean([d['mean_degree'] for d in deg]):.1f}" if deg else "-"
        orphans = f"{sum(d['no_in_edges'] for d in deg)}" if deg else "-"
        out.append(f"{kind:<16} {first_reaching(vis, r['recall'].mean(axis=1), target):>10} "
                   f"{first_reaching(vis, r['recall'].min(axis=1), target):>11} "
                   f"{r['recall'].mean(axis=1).max():>9.3f} {r['build_s']:>8.2f} "
                   f"{r['bytes'] / 2**20:>7.1f} {mean_deg:>8} {orphans:>10}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="retrieval-attn inspect",
                                description=__doc__.split("\n")[0])
    p.add_argument("context", type=Path, help="a folder written by LLM.save_context")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: all")
    p.add_argument("--indexes", nargs="+", default=list(KNOBS), choices=list(KNOBS))
    p.add_argument("--k", type=int, default=100,
                   help="recall@k: at most half the keys a head indexes")
    p.add_argument("--target", type=float, default=0.9, help="recall to reach, in (0, 1]")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG path (default: CONTEXT/inspect.png)")
    args = p.parse_args(argv)
    if not 0 < args.target <= 1:
        raise ConfigError(f"--target is {args.target}: a recall in (0, 1], e.g. 0.9")
    result = inspect(args.context, args.layers, args.indexes, args.k)
    print(table(result, args.k, args.target))
    path = args.plot or args.context / "inspect.png"
    plot({result["n"]: result["rows"]}, path, args.target)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Long-context accuracy of every KV policy on the same prompts, in one run.

Each prompt is prefilled once with exact attention; then every policy decodes from that
same prefill state, so differences come from decode-time attention alone. Prints one
table (policy x task accuracy, %), saves a NIAH heat-map (length x depth) per policy, and
per-layer diagnostics against dense attention for one prompt.

    retrieval-attn eval --lengths 4096 8100 --budgets 0.05 0.02
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import torch

from retrieval_attn import LLM, SamplingParams
from retrieval_attn.config import INDEX_KINDS, EngineConfig, IndexConfig, KVConfig
from retrieval_attn.engine import GenerationStats
from retrieval_attn.errors import ConfigError
from retrieval_attn.tools.capture_qk import RecordingKV
from retrieval_attn.tools.longctx_diagnostics import layer_diagnostics, rank_recall
from retrieval_attn.tools.longctx_tasks import Sample, make_samples, render

TASKS = ["niah", "multikey", "multivalue", "vartrack", "cwe", "multiquery", "extract"]
POLICIES = ["dense", "streaming", "quest", "retrieval"]


Policy = tuple[str, KVConfig, IndexConfig | None]


def parse_ablation(spec: str) -> dict:
    """'rank=32,sketch_dtype=int4' -> {'rank': 32, 'sketch_dtype': 'int4'}: kv keys set
    together (one lossy setting may take two keys), each checked by KVConfig."""
    fields = {f.name for f in dataclasses.fields(KVConfig)}
    out: dict = {}
    for item in spec.split(","):
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--ablate {spec!r}: write kv keys as KEY=VALUE[,...], KEY "
                              f"one of {', '.join(sorted(fields))}")
        value: object = {"true": True, "false": False}.get(text.lower(), text)
        for kind in (int, float):
            if isinstance(value, str):
                try:
                    value = kind(value)
                except ValueError:
                    pass
        out[key] = value
    return out


def policy_grid(base: KVConfig, budgets: list[float], policies: list[str] = POLICIES,
                indexes: list[str] = (), builder: str = "inline",
                ablate_tail: bool = False, ablations: list[str] = (),
                ablate_budget: float = 0.02) -> list[Policy]:
    """(name, kv config, index config) rows: dense, then every policy at every budget;
    retrieval also with each host index kind in indexes (named retrieval+KIND@budget),
    and without the tail estimate if ablate_tail (retrieval-notail@budget); then
    retrieval at ablate_budget with each of ablations' kv settings (parse_ablation),
    named retrieval[SPEC]@budget."""
    grid: list[Policy] = [("dense", dataclasses.replace(base, policy="dense"), None)]
    for b in budgets:
        top_k: int | float = int(b) if b >= 1 else b
        for name in policies:
            if name == "dense":
                continue
            cfg = dataclasses.replace(base, policy=name, top_k=top_k)
            grid.append((f"{name}@{b:g}", cfg, None))
            if name == "retrieval" and ablate_tail:
                grid.append((f"retrieval-notail@{b:g}",
                             dataclasses.replace(cfg, tail_estimate=False), None))
            if name == "retrieval":
                grid += [(f"retrieval+{kind}@{b:g}", cfg, IndexConfig(kind=kind,
                                                                      builder=builder))
                         for kind in indexes]
    top_k = int(ablate_budget) if ablate_budget >= 1 else ablate_budget
    for spec in ablations:
        label, _, keys = spec.rpartition(":")  # LABEL:KEY=VALUE,... names the row LABEL
        try:
            cfg = dataclasses.replace(base, policy="retrieval", top_k=top_k,
                                      **parse_ablation(keys))
        except ConfigError as e:
            raise ConfigError(f"--ablate {spec!r}: {e}") from None
        grid.append((f"{label or 'retrieval'}[{keys if not label else ''}]@{ablate_budget:g}"
                     .replace("[]", ""), cfg, None))
    return grid


def evaluate(llm: LLM, samples: list[Sample], grid: list[Policy],
             max_tokens: int, diagnose: Sample | None,
             checkpoint: Path | None = None, with_rank_recall: bool = False,
             sample_ids: list[int] | None = None) -> tuple[list[dict], dict]:
    """Rows (policy, task, score, ...) of every sample under every policy, each with its
    sample's id (sample_ids[i], default i: what pairs a row with dense's); with a
    checkpoint path, the rows so far are written there after each sample, so a run cut
    short keeps what it scored. Per-layer diagnostics of every sparse row on the
    diagnose sample, and its sketch's recall by rank if with_rank_recall."""
    engine, tok = llm.engine, llm.tokenizer
    params = SamplingParams(max_tokens=max_tokens)
    overhead = len(llm.encode([{"role": "user", "content": "x"}])) + 8
    rows, diagnostics = [], {}
    for i, sample in enumerate(samples):
        rng = random.Random(i)
        text = render(sample, tok.encode, tok.decode, rng, overhead)
        ids = llm.encode([{"role": "user", "content": text}])
        engine.check_prompt(ids)
        dense, queries = engine.kv, None
        if any(index is not None for _, _, index in grid):  # host indexes need the queries
            engine.runner.kv = RecordingKV(dense, list(range(llm.loaded.spec.num_layers)))
        dense.start_request(len(ids))
        logits = engine.runner.prefill(ids, progress=len(ids) >= 2048)
        if engine.runner.kv is not dense:
            queries = {layer: torch.cat(q, dim=1).float()  # [H, n, D]
                       for layer, q in engine.runner.kv.prefill.items()}
            engine.runner.kv = dense
        dense_k = dense.k[:, 0, :, :len(ids)].clone()  # [L, Hkv, n, D]
        dense_v = dense.v[:, 0, :, :len(ids)].clone()
        for name, cfg, index in grid:
            kv = None
            if cfg.policy != "dense":
                kv = engine.make_policy(cfg, index)
                kv.ingest(dense_k, dense_v, queries if index is not None else None)
                if sample is diagnose:
                    kv.trace = []
            stats = GenerationStats()
            tokens = list(engine.decode(logits, len(ids), params, stats, kv=kv))
            answer = tok.decode(tokens)
            # cut: the answer ran into max_tokens (or the context's end) before it ended
            rows.append({"policy": name, "sample": i if sample_ids is None else sample_ids[i],
                         "task": sample.task, "length": sample.length,
                         "prompt_tokens": len(ids), "depth": sample.depth,
                         "score": sample.score(answer), "answer": answer.strip()[:200],
                         "cut": stats.finish_reason == "length"})
            if kv is not None and kv.trace:
                first_step = [t for t in kv.trace if t.n == len(ids) + 1]
                exact = (dense_k, dense_v)  # the prefill's rows (an int8 store rounds them)
                diagnostics[name] = layer_diagnostics(first_step, kv, cfg, exact)
                if cfg.policy == "retrieval" and with_rank_recall:
                    diagnostics[f"rank-recall {name}"] = rank_recall(first_step, kv, cfg,
                                                                     exact=exact)
        print(f"[{i + 1}/{len(samples)}] {sample.task} {len(ids)} tok: " + " ".join(
            f"{r['policy']}={r['score']:.2f}" for r in rows[-len(grid):]), flush=True)
        if checkpoint is not None:
            checkpoint.write_text(json.dumps({"rows": rows, "diagnostics": diagnostics},
                                             indent=1))
    return rows, diagnostics


def accuracy_table(rows: list[dict]) -> list[str]:
    """Policy x task accuracy (%), per length and over all, policies in first-seen order;
    'cut' counts the answers that hit max_tokens before they ended (scored as they were),
    and a warning line follows the table when there are any."""
    lengths = sorted({r["length"] for r in rows})
    w = max([24, *(len(r["policy"]) + 1 for r in rows)])
    lines = [f"{'policy':<{w}}{'length':>7}" + "".join(f"{t:>11}" for t in TASKS) + f"{'avg':>8}"
             + f"{'cut':>9}"]
    first = rows[0]["policy"] if rows else None
    for length in lengths:  # prompts behind each cell
        mine = [r for r in rows if r["policy"] == first and r["length"] == length]
        lines.append(f"{'(prompts)':<{w}}{length!s:>7}"
                     + "".join(f"{sum(r['task'] == t for r in mine):>11}" for t in TASKS))
    for name in dict.fromkeys(r["policy"] for r in rows):
        for length in lengths + ["all"]:
            mine = [r for r in rows if r["policy"] == name and length in ("all", r["length"])]
            accs = [_mean([r["score"] for r in mine if r["task"] == t]) for t in TASKS]
            cut = f"{sum(r.get('cut', False) for r in mine)}/{len(mine)}"
            lines.append(f"{name:<{w}}{length!s:>7}" + "".join(f"{100 * a:>11.1f}" for a in accs)
                         + f"{100 * _mean([a for a in accs if a == a]):>8.1f}{cut:>9}")
    cut = sum(r.get("cut", False) for r in rows)
    if cut:
        lines.append(f"warning: {cut} of {len(rows)} answers hit max_tokens before they ended "
                     "and were scored cut short: raise --max-tokens (default 48) if the "
                     "scores look low")
    return lines


def agreement_table(rows: list[dict]) -> list[str]:
    """Each policy against dense on the same prompts: how many answers equal dense's, and
    on how many prompts it scored below (lost) or above (gained) dense, with the net
    points. Averages hide a loss on one prompt behind a lucky gain on another; this
    does not. Rows pair by their 'sample' id."""
    dense = {r["sample"]: r for r in rows if r["policy"] == "dense"}
    w = max([24, *(len(r["policy"]) + 1 for r in rows)])
    lines = [f"{'against dense':<{w}}{'same answer':>14}{'lost':>7}{'gained':>8}{'net':>8}"]
    for name in dict.fromkeys(r["policy"] for r in rows):
        if name == "dense":
            continue
        pairs = [(r, dense[r["sample"]]) for r in rows
                 if r["policy"] == name and r["sample"] in dense]
        if not pairs:
            continue
        same = sum(r["answer"] == d["answer"] for r, d in pairs)
        lost = sum(r["score"] < d["score"] for r, d in pairs)
        gained = sum(r["score"] > d["score"] for r, d in pairs)
        net = 100 * sum(r["score"] - d["score"] for r, d in pairs) / len(pairs)
        lines.append(f"{name:<{w}}{f'{same}/{len(pairs)}':>14}{lost:>7}{gained:>8}{net:>8.1f}")
    return lines


def heatmaps(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    niah = [r for r in rows if r["task"] == "niah"]
    lengths, depths = sorted({r["length"] for r in niah}), sorted({r["depth"] for r in niah})
    for policy in dict.fromkeys(r["policy"] for r in niah):
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for r in niah:
            if r["policy"] == policy:
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["score"]
        fig, ax = plt.subplots(figsize=(2 + len(lengths), 1 + 0.5 * len(depths)))
        ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(f"NIAH, {policy}")
        path = out / f"niah_{policy.replace('@', '_')}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="retrieval-attn eval", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="default")
    p.add_argument("--model", default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8100])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--per-task", type=int, default=2,
                   help="samples per task and length (NIAH: see --niah-per-depth)")
    p.add_argument("--niah-per-depth", type=int, default=1,
                   help="NIAH samples per depth and length")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="score only every N-th sample from the I-th: N processes with "
                        "I = 0..N-1 split one run; --report merges their results")
    p.add_argument("--slice", default=":", metavar="A:B",
                   help="score only samples A..B-1 of the run (samples go round the tasks "
                        "in turn, so a slice holds each task alike): splits a long run "
                        "over several invocations; --report merges them")
    p.add_argument("--no-diagnostics", action="store_true",
                   help="skip the per-layer diagnostics of the last NIAH prompt (they "
                        "decode it without CUDA graphs): for all but one of parallel runs")
    p.add_argument("--rank-recall", action="store_true",
                   help="also print the diagnosed prompt's recall by sketch rank (slow)")
    p.add_argument("--report", nargs="+", metavar="DIR", default=None,
                   help="print the table (and heat-maps in --out) of saved results.json "
                        "folders, merged; runs no model")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.02],
                   help="top_k per policy: share of the prompt (<1) or tokens (>=1)")
    p.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES,
                   help="KV policies besides dense (always run: the reference)")
    p.add_argument("--indexes", nargs="*", default=[], choices=INDEX_KINDS[1:],
                   help="host index kinds to run retrieval with too (built inline)")
    p.add_argument("--ablate-tail", action="store_true",
                   help="also run retrieval without kv.tail_estimate at every budget")
    p.add_argument("--ablate", nargs="*", default=[], metavar="KEY=VALUE[,...]",
                   help="retrieval rows at --ablate-budget with these kv settings, one row "
                        "each (e.g. rank=32,sketch_dtype=int4 host_dtype=int8); "
                        "LABEL:KEY=VALUE,... names the row LABEL")
    p.add_argument("--ablate-budget", type=float, default=0.02,
                   help="top_k of the --ablate rows (share of the prompt, or tokens)")
    p.add_argument("--max-tokens", type=int, default=48,
                   help="new tokens per answer; the table's 'cut' column counts answers "
                        "that hit it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/eval", help="folder for PNGs and results.json")
    args = p.parse_args(argv)
    SamplingParams(max_tokens=args.max_tokens)  # refuse a bad --max-tokens before any load
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        return report(args.report, out)
    shard, shards = _shard(args.shard)

    # one engine, dense (prefill state is shared by every row), long enough for all
    cfg = EngineConfig.load(args.config)
    grid = policy_grid(cfg.kv, args.budgets, args.policies, args.indexes,
                       ablate_tail=args.ablate_tail, ablations=args.ablate,
                       ablate_budget=args.ablate_budget)
    need = max(args.lengths) + args.max_tokens + 1
    cfg = cfg.replace(kv={"policy": "dense"}, index={"kind": "lowrank"},
                      runtime={"max_context_tokens": max(need,
                                                         cfg.runtime.max_context_tokens)})
    llm = LLM(args.model, config=cfg)
    every = by_turns(make_samples(args.lengths, args.depths, args.per_task, args.seed,
                                  args.niah_per_depth))
    ids = list(range(len(every)))[shard::shards][_slice(args.slice)]
    samples = [every[i] for i in ids]
    diagnose = None if args.no_diagnostics else next(
        (s for s in reversed(samples) if s.task == "niah"), None)
    rows, diagnostics = evaluate(llm, samples, grid, args.max_tokens, diagnose,
                                 checkpoint=out / "results.json",
                                 with_rank_recall=args.rank_recall, sample_ids=ids)
    pngs = heatmaps(rows, out)
    for name, table in diagnostics.items():
        print(f"\n{name} (one {diagnose.length}-token NIAH prompt, first decode step)")
        print("\n".join(table["lines"]))
    print(f"\nheat-maps: {', '.join(str(p) for p in pngs)}")
    kv = llm.config.kv
    print(f"\naccuracy (%), {llm.loaded.source}, window {kv.window_tokens} + {kv.sink_tokens} "
          f"sinks, rank {kv.rank}, rerank x{kv.rerank_factor}, {len(samples)} prompts")
    print("\n".join(accuracy_table(rows)))
    print("\n" + "\n".join(agreement_table(rows)))
    return 0


def report(folders: list[str], out: Path) -> int:
    """Merge the rows of saved runs (e.g. shards of one run) into one table."""
    rows = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: pass folders an eval run wrote (its --out)")
        mine = json.loads(path.read_text())["rows"]
        size = len({r["policy"] for r in mine})  # rows saved before ids: one block a prompt
        rows += [r if "sample" in r else dict(r, sample=f"{folder}#{i // size}")
                 for i, r in enumerate(mine)]
    pngs = heatmaps(rows, out)
    prompts = len(rows) // len({r["policy"] for r in rows})
    print(f"heat-maps: {', '.join(str(p) for p in pngs)}")
    print(f"\naccuracy (%), {prompts} prompts from {len(folders)} run(s)")
    print("\n".join(accuracy_table(rows)))
    print("\n" + "\n".join(agreement_table(rows)))
    return 0


def by_turns(samples: list[Sample]) -> list[Sample]:
    """The samples taking each task in turn (first of each task, then second, ...),
    each length's in order: any slice of a run holds every task alike."""
    out = []
    for length in dict.fromkeys(s.length for s in samples):
        queues = {}
        for s in samples:
            if s.length == length:
                queues.setdefault(s.task, []).append(s)
        while any(queues.values()):
            out += [q.pop(0) for q in queues.values() if q]
    return out


def _slice(spec: str) -> slice:
    a, sep, b = spec.partition(":")
    try:
        if not sep:
            raise ValueError
        return slice(int(a) if a else None, int(b) if b else None)
    except ValueError:
        raise ConfigError(f"--slice {spec!r}: write A:B (either may be empty), e.g. 0:20") \
            from None


def _shard(spec: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {spec!r}: write I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {spec}: need 0 <= I < N")
    return i, n


if __name__ == "__main__":
    raise SystemExit(main())

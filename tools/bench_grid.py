"""The loop both long-context benchmarks share: every (context, policy) alone, errors as rows."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable

import torch

from retrieval_attn.errors import RetrievalAttnError


def free_device() -> None:
    """Give back what the last run held (GPU cache and pinned host blocks)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch._C._host_emptyCache()


def run_grid(contexts: list[int], policies: list[str],
             run_one: Callable[[str, int], dict]) -> list[dict]:
    """run_one(policy, context) -> row, for every pair; a run that does not fit (out of
    memory, or refused by the planner) becomes a row with its error, and the grid goes on."""
    rows = []
    for n in contexts:
        for policy in policies:
            try:
                rows.append(run_one(policy, n))
            except (torch.OutOfMemoryError, RuntimeError, RetrievalAttnError) as e:
                rows.append({"policy": policy, "context": n, "error": str(e).splitlines()[0]})
                free_device()
            print(json.dumps(rows[-1]), flush=True)
    return rows


def write_json(rows: list[dict], path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)

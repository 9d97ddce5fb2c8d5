"""Micro-benchmarks of a decode step's parts at long contexts, on the GPU: the host
gathers (zero-copy reads of pinned host memory) and the candidate top-k.
`retrieval-attn bench --policies --gathers --topk` runs them (bench_decode's flags).
"""

from __future__ import annotations

import torch

from retrieval_attn.model.spec import named_shape

from .bench_grid import free_device


def bench_gathers(shape: str, n: int, candidates: int, top_k: int, reps: int = 4) -> dict:
    """µs per call of the decode step's host gathers on a store of n tokens, cycling
    through every layer (as decode does): K of the re-rank candidates, K+V of the final
    set, V alone of the final set, K of the candidates then V of the final set, and that
    again with the candidates in aligned runs of 4 (kv.select_block 4)."""
    from retrieval_attn.kernels import gather_k, gather_kv
    from retrieval_attn.offload import HostKVStore

    spec = named_shape(shape)
    store = HostKVStore(spec.num_layers, spec.num_kv_heads, n, spec.head_dim,
                        torch.bfloat16, pin=True)
    hkv, L = spec.num_kv_heads, spec.num_layers

    def idx(k):
        return torch.randint(0, n, (L, hkv, k), device="cuda")

    def runs(k, block=4):  # aligned runs of `block` rows (kv.select_block)
        starts = torch.randint(0, n // block, (L, hkv, k // block), device="cuda") * block
        return (starts[..., None] + torch.arange(block, device="cuda")).reshape(L, hkv, k)

    cand, final = idx(candidates), idx(top_k)
    chosen = cand[:, :, :top_k].contiguous()  # the final set is among the candidates
    run_cand = runs(candidates)
    # kv.select_block re-ranks position by position: the final set is scattered in the runs
    run_chosen = run_cand[:, :, torch.randperm(candidates, device="cuda")[:top_k]].contiguous()
    calls = {"K of candidates": lambda i: gather_k(store.k[i], cand[i]),
             "K+V of final": lambda i: gather_kv(store.k[i], store.v[i], final[i]),
             "V of final": lambda i: gather_k(store.v[i], final[i]),
             # what decode does per layer: its sum beside the two parts timed apart shows
             # the cost of switching between the K and V regions
             "K of candidates then V of final": lambda i: (
                 gather_k(store.k[i], cand[i]), gather_k(store.v[i], chosen[i])),
             # candidates in runs of 4 positions (kv.select_block 4), V of final among them:
             # reads of runs are not translation-bound
             "the same, candidates in runs of 4": lambda i: (
                 gather_k(store.k[i], run_cand[i]), gather_k(store.v[i], run_chosen[i]))}
    row = {"context": n}
    row.update(_time_calls(calls, L, reps))
    # the same K reads with every head in one launch (no MAX_HOST_SPAN grouping)
    one = {"K of candidates, one launch":
           lambda i: gather_k(store.k[i], cand[i], max_host_span=1 << 62)}
    row.update(_time_calls(one, L, reps))
    store = calls = None  # free the pinned store before the next one is made
    free_device()
    return row


def bench_topk(shape: str, n: int, k: int, reps: int = 5) -> dict:
    """µs per call of the candidate top-k (k of [Hkv, n] shares, unsorted) in float32 and
    in bfloat16 (what select_scores now writes for it), cycling through one buffer per
    layer, and the share of the float32 top-k that the bfloat16 one keeps."""
    spec = named_shape(shape)
    gen = torch.Generator(device="cuda").manual_seed(0)
    # shares-like values: softmax shares summed over a group, a few heavy hitters
    f32 = [torch.softmax(torch.randn(spec.num_kv_heads, n, device="cuda", generator=gen) * 3,
                         dim=-1) * (spec.num_heads // spec.num_kv_heads)
           for _ in range(spec.num_layers)]
    bf16 = [x.bfloat16() for x in f32]
    row = {"context": n}
    for name, xs in (("float32", f32), ("bfloat16", bf16)):
        row[name] = _time_calls({name: lambda i, xs=xs: xs[i].topk(k, dim=-1, sorted=False)},
                                spec.num_layers, reps)[name]
    kept = [len(set(a.topk(k).indices[0].tolist()) & set(b.topk(k).indices[0].tolist())) / k
            for a, b in zip(f32[:4], bf16[:4], strict=True)]
    row["bfloat16 keeps"] = sum(kept) / len(kept)
    del f32, bf16
    free_device()
    return row


def _time_calls(calls: dict, L: int, reps: int) -> dict:
    """µs per call of each fn(layer), cycling through the layers, replayed as one CUDA
    graph of L calls (as decode runs them: no launch overhead from the host)."""
    row = {}
    for name, fn in calls.items():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile, warm
            for i in range(L):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(L):
                fn(i)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        row[name] = start.elapsed_time(end) * 1e3 / (reps * L)
    return row

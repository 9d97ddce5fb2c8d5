"""Micro-benchmarks of a decode step's parts at long contexts, on the GPU: the host
gathers (zero-copy reads of pinned host memory), the candidate top-k and the sketch
scoring pass (select_scores) under variants of its launch constants.
`retrieval-attn bench --policies --gathers --topk --scores` runs them (bench_decode's flags).
"""

from __future__ import annotations

import torch

from retrieval_attn.model.spec import named_shape
from retrieval_attn.tools.bench_grid import free_device


def bench_gathers(shape: str, n: int, candidates: int, top_k: int, reps: int = 4) -> dict:
    """µs per call of the decode step's host gathers on a store of n tokens, cycling
    through every layer (as decode does): K of the re-rank candidates, K+V of the final
    set, V alone of the final set, K of the candidates then V of the final set, and that
    again with the candidates in aligned runs of 4 (kv.select_block 4)."""
    from retrieval_attn.kernels.gather_kv import gather_k, gather_kv
    from retrieval_attn.offload.kv_store import KVStore

    spec = named_shape(shape)
    store = KVStore(spec.num_layers, spec.num_kv_heads, n, spec.head_dim,
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
    wide = 1 << 62
    one = {"K of candidates, one launch":
           lambda i: gather_k(store.k[i], cand[i], max_host_span=wide),
           "runs of 4, one launch each": lambda i: (
               gather_k(store.k[i], run_cand[i], max_host_span=wide),
               gather_k(store.v[i], run_chosen[i], max_host_span=wide))}
    row.update(_time_calls(one, L, reps))
    store = calls = None  # free the pinned store before the next one is made
    free_device()
    return row


def bench_topk(shape: str, n: int, k: int, block: int, reps: int = 5) -> dict:
    """µs per call of the candidate top-k as a decode step takes it: the k // block best
    of [Hkv, n // block] bfloat16 block sums (kernels.topk_indices, in stages), against
    torch.topk of the same rows, cycling through one buffer per layer; and the share of
    torch.topk's set that ours finds in a row (1 but for ties at the cut)."""
    from retrieval_attn.kernels.select_topk import topk_indices

    spec = named_shape(shape)
    gen = torch.Generator(device="cuda").manual_seed(0)
    nb, kb = n // block, k // block
    # block sums of softmax shares summed over a group: a few heavy hitters, and -1 for
    # the blocks past the region (the window's)
    xs = [torch.softmax(torch.randn(spec.num_kv_heads, nb, device="cuda", generator=gen) * 3,
                        dim=-1).bfloat16() for _ in range(spec.num_layers)]
    for x in xs:
        x[:, -(512 // block):] = -1.0
    want = set(xs[0][0].float().topk(kb).indices.tolist())
    row = {"context": n, "torch.topk": _time_calls(
        {"t": lambda i: xs[i].topk(kb, dim=-1, sorted=False)}, spec.num_layers, reps)["t"]}
    got = set(topk_indices(xs[0], kb)[0].tolist())
    # bfloat16 ties at the cut may pick other columns of the same value
    row["ours same set"] = len(got & want) / kb
    row["ours"] = _time_calls({"t": lambda i: topk_indices(xs[i], kb)}, spec.num_layers,
                              reps)["t"]
    xs = None  # free the rows before the next context
    free_device()
    return row


# launch variants of the tail estimate's partial sums (kernels.tail_correct constants)
TAIL_VARIANTS = {
    "as built": {},
    "ieee dots": {"DOT_PRECISION": "ieee"},
    "tf32x3 dots": {"DOT_PRECISION": "tf32x3"},
    "warps 8": {"NUM_WARPS": 8},
    "4 programs/SM": {"PROGRAMS_PER_SM": 4},
    "block 32": {"BLOCK": 32},
}


def bench_tail(shape: str, n: int, top_k: int, variants: dict = TAIL_VARIANTS,
               reps: int = 20) -> list[dict]:
    """µs per call of the tail estimate on one layer of n tokens (tail_partials, then
    tail_merge), cycling through the layers' V chunk sums, under launch variants; each
    variant's largest difference from the built one's output."""
    import importlib

    from retrieval_attn.kernels.tail_correct import tail_merge, tail_partials
    from retrieval_attn.offload.tail import CHUNK, padded_chunks

    tc = importlib.import_module("retrieval_attn.kernels.tail_correct")
    spec = named_shape(shape)
    L, hkv, d = spec.num_layers, spec.num_kv_heads, spec.head_dim
    g = spec.num_heads // hkv
    gen = torch.Generator(device="cuda").manual_seed(0)
    mm = -(-n // CHUNK)
    sums = torch.randn(L, hkv, padded_chunks(n), d, device="cuda", generator=gen)
    mass = torch.rand(hkv, g, mm, device="cuda", generator=gen) / mm
    total = torch.randn(hkv, g, device="cuda", generator=gen)
    selected = torch.randint(4, n - 512, (hkv, top_k), device="cuda", generator=gen)
    scores = torch.randn(hkv, g, top_k, device="cuda", generator=gen)
    count = torch.tensor([top_k], device="cuda", dtype=torch.int32)
    pos = torch.tensor([n - 1], device="cuda")
    out = torch.randn(hkv, g, d, device="cuda", generator=gen).bfloat16()
    lse_att = total + 1.0

    def call(i):
        parts = tail_partials(mass, total, selected, scores, count, pos, sums[i],
                              d**-0.5, CHUNK)
        return tail_merge(out, lse_att, parts)

    built = {k: getattr(tc, k) for k in ("BLOCK", "NUM_WARPS", "DOT_PRECISION",
                                           "PROGRAMS_PER_SM")}
    want = call(0).float()
    rows = []
    try:
        for name, variant in variants.items():
            for k, v in {**built, **variant}.items():
                setattr(tc, k, v)
            diff = (call(0).float() - want).abs().max().item()
            t = _time_calls({name: call}, L, reps)[name]
            rows.append({"variant": name, "us": t, "max diff": diff,
                         "GB/s": hkv * padded_chunks(n) * d * 4 / t / 1e3})
    finally:
        for k, v in built.items():
            setattr(tc, k, v)
    sums = None  # free the V sums before the next context
    free_device()
    return rows


# launch variants of select_scores timed by bench_scores: module constants of
# retrieval_attn.kernels.select_scores (tiles of BLOCK_N positions, warps, pipeline stages,
# programs per SM in the split over positions), or of its outputs (chunk: tail masses per
# this many positions, 0 none; block: shares summed per this many); "as built" keeps all
SCORE_VARIANTS = {
    "as built": {},
    "warps 8": {"NUM_WARPS": 8},
    "stages 2": {"NUM_STAGES": 2},
    "stages 4": {"NUM_STAGES": 4},
    "tile 128": {"BLOCK_N": 128},
    "4 programs/SM": {"PROGRAMS_PER_SM": 4},
    "8 programs/SM": {"PROGRAMS_PER_SM": 8},
    # what the pass's outputs cost: without the tail's chunk masses, per-position shares
    "no chunk masses": {"chunk": 0},
    "per-position shares": {"block": 1},
}


def bench_scores(shape: str, n: int, rank: int, sketch_dtype: str, block: int,
                 variants: dict = SCORE_VARIANTS, reps: int = 20) -> list[dict]:
    """µs per call of select_scores over one layer's sketch of n tokens (cycling through
    the layers), as a decode step of the long-context presets calls it: one pass (the
    previous step's lse), window lse given, chunk masses for the tail estimate, and block
    sums when block > 1; then two passes (kv.score_passes 2). Per launch variant: µs,
    GB/s of sketch read (Hkv·n·r·bits/8 bytes a pass / time) and the largest difference of
    its block sums from the built launch's (launch variants must compute the same thing;
    0 for a variant of other outputs)."""
    import importlib

    from retrieval_attn.kernels.formats import LseState
    from retrieval_attn.kernels.select_scores import select_scores
    from retrieval_attn.offload.tail import CHUNK as TAIL_CHUNK

    ss = importlib.import_module("retrieval_attn.kernels.select_scores")
    spec = named_shape(shape)
    L, hkv, d = spec.num_layers, spec.num_kv_heads, spec.head_dim
    g = spec.num_heads // hkv
    gen = torch.Generator(device="cuda").manual_seed(0)
    bits = 16 if sketch_dtype == "auto" else {"int8": 8, "int4": 4}[sketch_dtype]
    width = rank // 2 if bits == 4 else rank
    if bits == 16:
        keys = torch.randn(L, hkv, n, width, device="cuda", generator=gen).bfloat16()
    else:
        keys = torch.randint(-100 if bits == 8 else 0, 100 if bits == 8 else 255,
                             (L, hkv, n, width), device="cuda", generator=gen,
                             dtype=torch.int32).to(torch.int8 if bits == 8 else torch.uint8)
    q = torch.randn(hkv, g, d, device="cuda", generator=gen)
    basis = torch.randn(hkv, d, rank, device="cuda", generator=gen) * d**-0.5
    mean = torch.zeros(hkv, d, device="cuda")
    other = torch.randn(hkv, g, device="cuda", generator=gen)
    lo, hi = 4, torch.tensor([n - 600], device="cuda")
    states = [LseState.empty(hkv, g, torch.device("cuda")) for _ in range(L)]

    def call(i, passes=1, at=hi, chunk=TAIL_CHUNK, block=block):
        return select_scores(q, basis, mean, keys[i], lo, at, d**-0.5, other, chunk,
                             torch.bfloat16, states[i] if passes == 1 else None, block)

    for i in range(L):  # a previous step: every later call normalises by its region lse
        call(i, at=hi - 1)

    nbytes = hkv * n * width * keys.element_size()  # read per call and pass
    built = {k: getattr(ss, k) for k in ("BLOCK_N", "NUM_WARPS", "NUM_STAGES",
                                           "PROGRAMS_PER_SM")}
    want = call(0)[0].float()
    rows = []
    try:
        for name, variant in variants.items():
            args = {k: v for k, v in variant.items() if k in ("chunk", "block")}
            for k, v in {**built, **variant}.items():
                if k not in args:
                    setattr(ss, k, v)
            out = call(0, **args)[0].float()
            diff = (out - want).abs().max().item() if out.shape == want.shape else 0.0
            t = _time_calls({name: lambda i, args=args: call(i, **args)}, L, reps)[name]
            rows.append({"variant": name, "passes": 1, "us": t, "GB/s": nbytes / t / 1e3,
                         "max diff": diff})
            if name == "as built":
                t2 = _time_calls({name: lambda i: call(i, 2)}, L, reps)[name]
                rows.append({"variant": name, "passes": 2, "us": t2,
                             "GB/s": 2 * nbytes / t2 / 1e3, "max diff": 0.0})
    finally:
        for k, v in built.items():
            setattr(ss, k, v)
    keys = states = None  # free the sketch before the next context
    free_device()
    return rows


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

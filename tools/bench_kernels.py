"""Decode attention of one layer over window + retrieved tokens: our kernels vs baselines.

Shape (defaults): one Llama-3-8B layer (H=32 query / Hkv=8 kv heads, D=128, bf16), a host KV
store of N=128K tokens in pinned memory, K=2048 retrieved tokens per kv head (random per
head), a GPU window of 512 recent + 4 sink tokens. Rows, all in the same run:

  ours       gather_kv (zero-copy from pinned host) + sparse_attention (window + retrieved)
  (i)        indices to host, torch.index_select on the pinned store, copy to GPU, SDPA
  (ii)       dense SDPA over all N tokens resident in HBM (the quality reference; memory-bound)
  and the parts: gather_kv from pinned host, gather_kv from device memory, sparse_attention.

SDPA runs with the FLASH backend forced and enable_gqa=True (the default pick for GQA is
slow, see DESIGN.md). Two timings per row, L2 flushed before each call:
  eager  CUDA events around one eager call that starts on an idle GPU: what an uncaptured
         decode step pays, Python and kernel-launch overhead included; median of --reps.
  graph  triton.testing.do_bench (median) of replaying a CUDA graph of the call: the device
         time a decode step captured in CUDA graphs pays. Rows with CPU work have none.
GB/s counts KV bytes read, formula printed beside each figure (graph time where there is one).

    python -m retrieval_attn.tools.bench_kernels --tokens 131072 --retrieved 2048
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from retrieval_attn.kernels.gather_kv import gather_kv
from retrieval_attn.kernels.sparse_attention import sparse_attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=131072, help="host store tokens N")
    p.add_argument("--retrieved", type=int, default=2048, help="retrieved tokens K per kv head")
    p.add_argument("--window", type=int, default=512, help="recent tokens on the GPU")
    p.add_argument("--sinks", type=int, default=4, help="sink tokens on the GPU")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--reps", type=int, default=50, help="timed calls per row")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def latency_ms(fn: Callable[[], object], reps: int, flush: torch.Tensor) -> float:
    """Median CUDA-event time of one call started on an idle GPU with a cold L2."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        flush.zero_()
        torch.cuda.synchronize()
        start.record()
        fn()  # CPU work inside fn delays `end`, so it is counted
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], reps: int) -> float:
    """Median device time of replaying a CUDA graph of `fn` (do_bench flushes L2 each call)."""
    import triton

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=max(20, reps),
                                   return_mode="median")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device")
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(args.seed)
    dev = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    n, k, hkv, h, d = args.tokens, args.retrieved, args.kv_heads, args.q_heads, args.head_dim
    na = args.window + args.sinks
    esize = torch.empty((), dtype=dtype).element_size()

    # Host store of one layer, pinned; the same KV resident in HBM for (ii) and the fallback.
    k_dev = torch.randn(hkv, n, d, device=dev, dtype=dtype)
    v_dev = torch.randn(hkv, n, d, device=dev, dtype=dtype)
    k_host = torch.empty(hkv, n, d, dtype=dtype, pin_memory=True).copy_(k_dev)
    v_host = torch.empty(hkv, n, d, dtype=dtype, pin_memory=True).copy_(v_dev)
    idx = torch.stack([torch.randperm(n, device=dev)[:k] for _ in range(hkv)]).to(torch.int32)
    q = torch.randn(1, h, d, device=dev, dtype=dtype)
    # Window + retrieved in one buffer for the SDPA baseline: window first, retrieved after.
    kv_cat = torch.randn(2, 1, hkv, na + k, d, device=dev, dtype=dtype)
    k_a, v_a = kv_cat[0, :, :, :na], kv_cat[1, :, :, :na]
    len_a = torch.full((1,), na, dtype=torch.int32, device=dev)
    len_b = torch.full((1,), k, dtype=torch.int32, device=dev)
    k_b = torch.empty(hkv, k, d, device=dev, dtype=dtype)
    v_b = torch.empty(hkv, k, d, device=dev, dtype=dtype)
    k_stage = torch.empty(hkv, k, d, dtype=dtype, pin_memory=True)
    v_stage = torch.empty(hkv, k, d, dtype=dtype, pin_memory=True)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=dev)  # > L2

    def ours():
        gather_kv(k_host, v_host, idx, out=(k_b, v_b))
        return sparse_attention(q, k_a, v_a, len_a, k_b[None], v_b[None], len_b)[0]

    def cpu_gather_sdpa():
        idx_host = idx.cpu()
        for head in range(hkv):
            torch.index_select(k_host[head], 0, idx_host[head], out=k_stage[head])
            torch.index_select(v_host[head], 0, idx_host[head], out=v_stage[head])
        kv_cat[0, 0, :, na:].copy_(k_stage, non_blocking=True)
        kv_cat[1, 0, :, na:].copy_(v_stage, non_blocking=True)
        return F.scaled_dot_product_attention(q[:, :, None], kv_cat[0], kv_cat[1],
                                              enable_gqa=True)[:, :, 0]

    def dense_sdpa():
        return F.scaled_dot_product_attention(q[:, :, None], k_dev[None], v_dev[None],
                                              enable_gqa=True)

    gather_bytes = 2 * hkv * k * d * esize
    used_bytes = 2 * hkv * (k + na) * d * esize
    rows = [  # label, fn, bytes, formula, capturable in a CUDA graph
        ("ours: gather_kv (pinned host) + sparse_attention", ours, used_bytes,
         "2*Hkv*(K+Na)*D*b/t", True),
        ("  gather_kv, pinned host (zero-copy)",
         lambda: gather_kv(k_host, v_host, idx, out=(k_b, v_b)), gather_bytes,
         "2*Hkv*K*D*b/t", True),
        ("  gather_kv, device memory (fallback)",
         lambda: gather_kv(k_dev, v_dev, idx, out=(k_b, v_b)), gather_bytes,
         "2*Hkv*K*D*b/t", True),
        ("  sparse_attention (window + retrieved)",
         lambda: sparse_attention(q, k_a, v_a, len_a, k_b[None], v_b[None], len_b),
         used_bytes, "2*Hkv*(K+Na)*D*b/t", True),
        ("(i) CPU index_select + H2D copy + SDPA", cpu_gather_sdpa, used_bytes,
         "2*Hkv*(K+Na)*D*b/t", False),
        ("(ii) dense SDPA over N in HBM", dense_sdpa, 2 * hkv * n * d * esize,
         "2*Hkv*N*D*b/t", True),
    ]

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        # Same tokens, same softmax: ours and (i) must agree.
        out_ours = ours().float()
        out_cpu = cpu_gather_sdpa().float()
        diff = (out_ours - out_cpu).abs().max().item()
        results = []
        for label, fn, nbytes, formula, capturable in rows:
            eager = latency_ms(fn, args.reps, flush)
            graph = None
            if capturable:
                try:
                    graph = graph_ms(fn, args.reps)
                except RuntimeError as err:  # report the row without a graph time
                    print(f"{label.strip()}: CUDA graph capture failed: {err}")
            results.append((label, eager, graph, nbytes, formula))

    name = torch.cuda.get_device_name(dev)
    print(f"device: {name} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"layer: H={h} Hkv={hkv} D={d} {args.dtype} (b={esize} bytes); host store N={n} "
          f"tokens pinned; retrieved K={k}/kv head (random); window Na={args.window}+"
          f"{args.sinks} sinks")
    print(f"check: max |ours - (i)| = {diff:.3g}")
    t_eager, t_graph = results[0][1], results[0][2]
    head = (f"{'path':<50} {'eager ms':>8} {'x ours':>7} {'graph ms':>8} {'x ours':>7} "
            f"{'GB/s':>7}  GB/s formula")
    print(head)
    print("-" * len(head))
    for label, eager, graph, nbytes, formula in results:
        g_ms = f"{'-':>8} {'-':>7}"
        if graph is not None and t_graph is not None:
            g_ms = f"{graph:>8.3f} {graph / t_graph:>7.2f}"
        gbs = nbytes / (graph if graph is not None else eager) / 1e6
        print(f"{label:<50} {eager:>8.3f} {eager / t_eager:>7.2f} {g_ms} {gbs:>7.1f}  {formula}")
    print("x ours = row time / ours time in the same column (> 1: ours is faster). eager: one "
          "call on an idle GPU; graph: CUDA-graph replay; L2 flushed before each call.")
    i_eager, ii_graph = results[4][1], results[5][2]
    if t_graph is not None and ii_graph is not None:
        print(f"ours in a CUDA graph ({t_graph:.3f} ms): (i) eager / ours = "
              f"{i_eager / t_graph:.2f}x; (ii) in a CUDA graph / ours = {ii_graph / t_graph:.2f}x")

if __name__ == "__main__":
    main()

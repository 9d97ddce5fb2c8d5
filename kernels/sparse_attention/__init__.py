"""sparse_attention: decode attention of one new token over two KV sources, one softmax.

Source a is the GPU window (sinks + recent tokens), source b the tokens retrieved for this
step; both are attended with a single softmax, as if concatenated. Split-K (flash-decoding):
the grid is (B*Hkv, splits over a + splits over b), each program covering one chunk for the
G query heads of one kv head (each K/V row is read once), followed by a small kernel that
merges the partials by log-sum-exp. The wrapper sizes the chunks from Na + Nb so that a
layer with few kv heads still fills the GPU. With source b empty it is plain flash-decoding
over one cache: dense decode in HBM (offload/dense.py) uses it so.

Where it runs: CUDA when q is on a CUDA device; the Triton interpreter on the CPU when
TRITON_INTERPRET=1 (tests); otherwise the float32 reference `sparse_attention_ref`.
"""

import torch

from retrieval_attn.kernels._launch import (
    PROGRAMS_PER_SM,
    cdiv,
    interpreting,
    next_power_of_2,
    sm_count,
    use_triton,
)
from retrieval_attn.kernels.sparse_attention.ref import sparse_attention_ref

__all__ = ["sparse_attention", "sparse_attention_ref"]

BLOCK_N = 64  # tokens per inner tile
MIN_HEAD_ROWS = 16  # tl.dot needs >= 16 rows: the G heads of a kv head are padded to this
MAX_SPLITS = 1024  # partials per head at most (a dense 1M-token cache has ~64 per kv head)
MERGE_TILE = 64  # partials the merge kernel reads per iteration
NUM_WARPS = 4


def _check_source(name: str, k: torch.Tensor, v: torch.Tensor, ln: torch.Tensor,
                  q: torch.Tensor) -> None:
    b, _, d = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k_{name}, v_{name} must be [B={b}, Hkv, N{name}, D={d}]; got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k_{name}, v_{name} must have q's dtype {q.dtype}")
    if k.device != q.device or v.device != q.device or ln.device != q.device:
        raise ValueError(f"k_{name}, v_{name}, len_{name} must be on q's device {q.device}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"k_{name}, v_{name} need a contiguous last dim")
    if ln.shape != (b,) or ln.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"len_{name} must be [B={b}] int32/int64; got {tuple(ln.shape)} "
                         f"{ln.dtype}")


def _check_indexed(k: torch.Tensor, v: torch.Tensor, ln: torch.Tensor, idx: torch.Tensor,
                   scales: tuple[torch.Tensor, torch.Tensor] | None, q: torch.Tensor) -> None:
    b, _, d = q.shape
    if (k.dim() != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d
            or k.dtype != torch.int8 or v.dtype != torch.int8):
        raise ValueError(f"with idx_b, k_b and v_b must be int8 store rows [B={b}, Hkv, N, "
                         f"D={d}]; got {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    if (idx.dim() != 3 or idx.shape[:2] != k.shape[:2]
            or idx.dtype not in (torch.int32, torch.int64) or idx.stride(-1) != 1):
        raise ValueError(f"idx_b must be [B, Hkv, Nb] int32/int64 (last dim contiguous) "
                         f"for rows {tuple(k.shape)}; got {tuple(idx.shape)} {idx.dtype}")
    if scales is None or any(t.shape != k.shape[:3] or t.stride(-1) != 1 for t in scales):
        raise ValueError(f"with idx_b, scales_b must be (k_scale, v_scale) [B, Hkv, N] = "
                         f"{tuple(k.shape[:3])}, last dim contiguous")
    if any(t.device != q.device for t in (k, v, ln, idx, *scales)):
        raise ValueError(f"k_b, v_b, len_b, idx_b, scales_b must be on q's device {q.device}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride()[:3] != v.stride()[:3]:
        raise ValueError("k_b, v_b need a contiguous last dim and the same strides")
    if scales[0].stride() != scales[1].stride():
        raise ValueError("k_scale and v_scale need the same strides")
    if ln.shape != (b,) or ln.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"len_b must be [B={b}] int32/int64; got {tuple(ln.shape)} {ln.dtype}")


def _gathered(rows_k: torch.Tensor, rows_v: torch.Tensor, idx: torch.Tensor,
              scales: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Source b as gather_kv's reference makes it: [B, Hkv, Nb, D] each, in dtype."""
    from retrieval_attn.kernels.gather_kv import gather_kv_ref

    b, hkv, n, d = rows_k.shape
    flat = [t.reshape(b * hkv, *t.shape[2:]) for t in (rows_k, rows_v, idx, *scales)]
    k, v = gather_kv_ref(flat[0], flat[1], flat[2], scales=(flat[3], flat[4]), dtype=dtype)
    return k.view(b, hkv, -1, d), v.view(b, hkv, -1, d)


def sparse_attention(
    q: torch.Tensor,
    k_a: torch.Tensor,
    v_a: torch.Tensor,
    len_a: torch.Tensor,
    k_b: torch.Tensor,
    v_b: torch.Tensor,
    len_b: torch.Tensor,
    scale: float | None = None,
    idx_b: torch.Tensor | None = None,
    scales_b: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the valid tokens of both sources, with one softmax.

    Args:
        q: [B, H, D] float16/bfloat16/float32, last dim contiguous; D a power of two in
            [16, 256] (64 and 128 are the tested sizes).
        k_a, v_a: [B, Hkv, Na, D] source a (the GPU window), q's dtype and device.
        len_a: [B] int32/int64: valid tokens of source a; tokens at index >= len_a are
            ignored whatever they hold.
        k_b, v_b: [B, Hkv, Nb, D] source b (the retrieved tokens); Nb may be 0.
        len_b: [B] int32/int64, valid tokens of source b.
        scale: score scale; default D**-0.5.
        idx_b, scales_b: source b read by index from an int8 store, as gather_kv would
            gather it (each row's integers times its scale, rounded to q's dtype) but
            without writing the gathered copy: k_b, v_b are then the store's int8 rows
            [B, Hkv, N, D], idx_b [B, Hkv, Nb] int32/int64 the rows of source b (each in
            [0, N): not checked, no sync) and scales_b (k_scale, v_scale) [B, Hkv, N].
    H must be a multiple of Hkv; query head h reads kv head h // G, G = H // Hkv. Lengths
    above Na / Nb are clamped to them. A row with no valid token in either source (both
    lengths 0 at run time) gets out = 0 and lse = -inf.

    Returns:
        out: [B, H, D] in q's dtype.
        lse: [B, H] float32, natural-log sum of exp(scaled scores) over both sources.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D]; got {tuple(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16, bfloat16 or float32; got {q.dtype}")
    if q.stride(-1) != 1:
        raise ValueError("q needs a contiguous last dim")
    _check_source("a", k_a, v_a, len_a, q)
    indexed = idx_b is not None
    if indexed:
        _check_indexed(k_b, v_b, len_b, idx_b, scales_b, q)
    else:
        _check_source("b", k_b, v_b, len_b, q)
    b, h, d = q.shape
    hkv, na, nb = k_a.shape[1], k_a.shape[2], (idx_b if indexed else k_b).shape[2]
    if k_b.shape[1] != hkv or hkv == 0 or h % hkv != 0:
        raise ValueError(f"H={h} must be a multiple of Hkv; sources have Hkv={hkv} and "
                         f"{k_b.shape[1]}")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"D must be a power of two in [16, 256]; got {d}")
    if na + nb == 0:
        raise ValueError("both sources are empty (Na + Nb == 0)")
    scale = d**-0.5 if scale is None else float(scale)
    if not use_triton(q.device):
        if indexed:
            k_b, v_b = _gathered(k_b, v_b, idx_b, scales_b, q.dtype)
        return sparse_attention_ref(q, k_a, v_a, len_a, k_b, v_b, len_b, scale)

    from retrieval_attn.kernels.sparse_attention.kernel import (
        sparse_attention_merge_kernel,
        sparse_attention_split_kernel,
    )

    # the kernel reads len[b] at offset b: lengths expanded from one value (stride 0) are
    # made real [B] tensors
    len_a, len_b = len_a.contiguous(), len_b.contiguous()

    g = h // hkv
    # Chunk size: about PROGRAMS_PER_SM programs per SM over the B*Hkv heads. The chunk is
    # a kernel constant (a fixed trip count), so it is rounded to BLOCK_N times a power of
    # two: a growing Na or Nb recompiles the kernel a logarithmic number of times, not
    # every step.
    want = cdiv(PROGRAMS_PER_SM * sm_count(q.device), b * hkv)
    want = max(1, min(want, MAX_SPLITS // 2 - 1))  # rounding may double; each source +1
    chunk = BLOCK_N * next_power_of_2(cdiv(na + nb, want * BLOCK_N))
    splits_a = cdiv(na, chunk)
    splits = splits_a + cdiv(nb, chunk)

    # float16/bfloat16 dots run on tensor cores in the input dtype (p is rounded to it before
    # p @ V, as in flash attention); float32 inputs use exact fp32 dots, not tf32. Triton
    # 3.6's interpreter computes bfloat16 dots wrongly, so under it they run in float32.
    dot_f32 = q.dtype == torch.float32 or (interpreting() and q.dtype == torch.bfloat16)

    # One allocation for all partials (layout in kernel.py): acc [B*H*S, D], max, sum.
    part = torch.empty((b * h * splits) * (d + 2), dtype=torch.float32, device=q.device)
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, dtype=torch.float32, device=q.device)

    if indexed:
        ks, vs = scales_b
        index_args = (idx_b, ks, vs, *idx_b.stride()[:2], *ks.stride()[:2])
    else:  # unread
        index_args = (len_b, len_b, len_b, 0, 0, 0, 0)
    sparse_attention_split_kernel[(b * hkv, splits)](
        q, k_a, v_a, len_a, k_b, v_b, len_b, *index_args[:3], part,
        scale, na, nb, hkv, b * h, splits_a, splits,
        *q.stride()[:2], *k_a.stride()[:3], *v_a.stride()[:3],
        *k_b.stride()[:3], *v_b.stride()[:3], *index_args[3:],
        G=g, G_PAD=max(MIN_HEAD_ROWS, next_power_of_2(g)), D=d, CHUNK=chunk,
        BLOCK_N=BLOCK_N, INDEXED=indexed, DOT_F32=dot_f32,
        DOT_PRECISION="ieee" if dot_f32 else "tf32", num_warps=NUM_WARPS,
        # two loops' pipelines (window, int8 rows) in float32 would pass shared memory
        num_stages=2 if indexed and q.dtype == torch.float32 else 3,
    )
    tile = min(MERGE_TILE, next_power_of_2(splits))
    sparse_attention_merge_kernel[(b * h,)](
        part, out, lse, h, b * h, splits, *out.stride()[:2], *lse.stride(),
        D=d, S_TILE=tile, S_TILES=cdiv(splits, tile), num_warps=NUM_WARPS,
    )
    return out, lse

"""LowRankKeys: a per-kv-head PCA sketch of the post-RoPE keys, for cheap scoring on the GPU.

Why PCA of post-RoPE keys (Loki-style) rather than SVD of pre-RoPE keys (ShadowKV): the
sketch scores q·k directly, with no per-position rotation work and no chunk landmarks.
Keys are centred first: q·k = q·mean + q·(k - mean); the first term is exact and the same
for every key, so the sketch spends its rank on the centred part, which PCA captures best.

The projected keys may be stored as int8 or packed int4 (`sketch` "int8" / "int4"), each
sketch dim with its own absmax scale fitted on the prompt: at equal bytes a quantised
sketch of higher rank ranks far better (tools/eval_sketch: rank 16 of 64 in float 0.31
recall of the true top-40, rank 32 in int8 0.70, rank 64 in int4 0.81). The scales are
folded into the basis when scoring, so the kernel reads only the integers.
"""

from __future__ import annotations

import torch

from retrieval_attn.config import SKETCH_DTYPES  # auto: the model's dtype
from retrieval_attn.kernels.formats import (
    INT_MAX,
    LseState,
    SketchLayer,
    SketchQuery,
    sketch_rows,
    sketch_storage,
    sketch_values,
)
from retrieval_attn.kernels.select_scores import select_scores, select_scores_ref
from retrieval_attn.kernels.sketch_query import (
    sketch_query,
    sketch_query_ref,
    sketch_scores_at,
    sketch_scores_at_ref,
)

# tokens quantised at a time when a prompt is stored: the temporaries of rounding and
# packing (~10 bytes per sketch value, STORE_BYTES_PER_VALUE) stay at 20 MiB per kv head
# at rank 128, where the prompt's float32 projection is already 4·n·r bytes
STORE_TOKENS = 1 << 14
STORE_BYTES_PER_VALUE = 10
# a sketch dim's integer step is at least this share of the head's largest: dims with no
# spread in the prompt (shorter than the rank) still score decode tokens
MIN_SCALE_RATIO = 1e-3


class LowRankKeys:
    """mean [L, Hkv, D], basis [L, Hkv, D, r], projected keys [L, Hkv, N, r] on the device
    (int8 [L, Hkv, N, r] or packed int4 uint8 [L, Hkv, N, r / 2] with per-dim scales
    [L, Hkv, r] when quantised)."""

    def __init__(self, num_layers: int, num_kv_heads: int, max_tokens: int, head_dim: int,
                 rank: int, device: torch.device, dtype: torch.dtype,
                 sketch: str = "auto") -> None:
        if sketch not in SKETCH_DTYPES:
            raise ValueError(f"sketch {sketch!r}: one of {', '.join(SKETCH_DTYPES)}")
        if sketch == "int4" and rank % 2:
            raise ValueError(f"an int4 sketch packs two dims per byte: rank {rank} must be even")
        self.rank, self.sketch = rank, sketch
        quantised = sketch != "auto"
        # a quantised sketch's basis and mean are tiny: float32, so that decode tokens are
        # centred and projected exactly as build did the prompt's (a rounded mean would
        # shift every decode token's integers)
        basis_dtype = torch.float32 if quantised else dtype
        self.mean = torch.zeros(num_layers, num_kv_heads, head_dim, device=device,
                                dtype=basis_dtype)
        self.basis = torch.zeros(num_layers, num_kv_heads, head_dim, rank, device=device,
                                 dtype=basis_dtype)
        width = rank // 2 if sketch == "int4" else rank
        key_dtype = {"auto": dtype, "int8": torch.int8, "int4": torch.uint8}[sketch]
        self.keys = torch.zeros(num_layers, num_kv_heads, max_tokens, width, device=device,
                                dtype=key_dtype)
        # per-dim step of the integers [L, Hkv, r]; unused (ones) for a float sketch
        self.scale = torch.ones(num_layers, num_kv_heads, rank, device=device,
                                dtype=torch.float32)

    def build(self, layer: int, k: torch.Tensor, heads: slice = slice(None)) -> None:
        """Fit the given heads' bases on a prompt's keys k [heads, n, D]; project them all."""
        kf = k.to(self.keys.device, torch.float32)
        mean = kf.mean(dim=1, keepdim=True)  # [Hkv, 1, D]
        centred = kf - mean
        cov = centred.transpose(1, 2) @ centred  # [Hkv, D, D]
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        basis = vecs[..., -self.rank:]  # [Hkv, D, r]
        self.mean[layer, heads] = mean[:, 0].to(self.mean.dtype)
        self.basis[layer, heads] = basis.to(self.basis.dtype)
        projected = centred @ basis  # [Hkv, n, r] float32
        if self.sketch != "auto":
            # absmax without an abs() copy of the prompt's projection
            top = torch.maximum(projected.amax(dim=1), -projected.amin(dim=1))  # [Hkv, r]
            top = torch.maximum(top, MIN_SCALE_RATIO * top.amax(-1, keepdim=True)).clamp_min(
                1e-12)
            self.scale[layer, heads] = top / INT_MAX[self.keys.dtype]
        scale = self.scale[layer, heads]
        for i in range(0, k.shape[1], STORE_TOKENS):
            part = projected[:, i:i + STORE_TOKENS]
            self.keys[layer, heads, i:i + part.shape[1]] = sketch_storage(
                part, scale, self.keys.dtype)

    def state(self, n: int) -> dict[str, torch.Tensor]:
        """The sketch of a prompt's n tokens, on the host, as a saved context keeps it:
        mean [L, R, D], basis [L, R, D, r], keys [L, R, n, r] (uint8 [.., r / 2] packed
        int4), and for an integer sketch scale [L, R, r]."""
        scale = {"scale": self.scale.cpu()} if self.sketch != "auto" else {}
        return {"mean": self.mean.cpu(), "basis": self.basis.cpu(),
                "keys": self.keys[:, :, :n].contiguous().cpu(), **scale}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """state()'s tensors back into the sketch (its n from keys [L, R, n, ·])."""
        n = state["keys"].shape[2]
        self.mean.copy_(state["mean"])
        self.basis.copy_(state["basis"])
        self.keys[:, :, :n].copy_(state["keys"])
        if self.sketch != "auto":
            self.scale.copy_(state["scale"])

    def layer(self, layer: int) -> SketchLayer:
        """One layer's sketch (views), as kernels.append_token writes decode tokens into it."""
        return SketchLayer(self.mean[layer], self.basis[layer], self.scale[layer],
                           self.keys[layer])

    def append(self, layer: int, pos: torch.Tensor, k: torch.Tensor) -> None:
        """k [Hkv, 1, D] of the token at position pos ([1] on the device; no sync), projected
        in float32 (a decode token beyond the prompt's range saturates at the largest
        integer). A decode step appends through kernels.append_token instead."""
        self.keys[layer].index_copy_(1, pos, sketch_rows(k[:, 0], self.layer(layer))[:, None])

    def query(self, layer: int, q: torch.Tensor) -> SketchQuery:
        """q [Hkv, G, D] as select_scores scores this layer's sketch (kernels.sketch_query;
        through int8 when the keys are integers): for `shares` and `scores_at`."""
        # the Triton kernel on a GPU; elsewhere its reference (not the interpreter)
        fn = sketch_query if self.keys.is_cuda else sketch_query_ref
        return fn(q, self.basis[layer], None if self.sketch == "auto" else self.scale[layer],
                  self.mean[layer], self.sketch != "auto")

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def scores(self, layer: int, q: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Approximate q·k. q [Hkv, G, D] -> [Hkv, G, hi - lo]."""
        constant = q @ self.mean[layer, :, :, None]  # [Hkv, G, 1]: q·mean, same for all keys
        if self.sketch == "auto":
            qr = q @ self.basis[layer]  # [Hkv, G, r]
            return qr @ self.keys[layer, :, lo:hi].transpose(1, 2) + constant
        qr = self.query(layer, q).values()
        keys = sketch_values(self.keys[layer, :, lo:hi])
        return (qr @ keys.transpose(1, 2)).to(q.dtype) + constant

    def scores_at(self, layer: int, query: SketchQuery, positions: torch.Tensor
                  ) -> torch.Tensor:
        """Approximate q·k of given positions, float32 (as select_scores scores them).
        query: self.query(layer, q) of q [Hkv, G, D]; positions [Hkv, K] -> [Hkv, G, K]."""
        # the Triton kernel on a GPU; elsewhere its reference (not the interpreter)
        fn = sketch_scores_at if self.keys.is_cuda else sketch_scores_at_ref
        return fn(query, self.keys[layer], positions)

    def shares(self, layer: int, q: torch.Tensor, lo: int, hi: torch.Tensor, scale: float,
               other_lse: torch.Tensor | None = None, chunk: int = 0,
               shares_dtype: torch.dtype = torch.float32,
               lse_state: LseState | None = None, block: int = 1,
               query: SketchQuery | None = None, tail_sums: torch.Tensor | None = None,
               sm_share: float = 1.0) -> tuple:
        """What the retriever ranks by, fused: q [Hkv, G, D] -> (shares [Hkv, N - lo]
        shares_dtype (bfloat16 where only their top-k is wanted), lse [Hkv, G] float32).
        shares = group_scores of the scores of positions [lo, N) with positions >= hi
        ([1] device tensor) excluded; lse = each head's log-sum-exp over [lo, hi) of the
        scaled scores, log-added to other_lse. Scores are float32 throughout and
        [Hkv, G, N] is never stored (kernels.select_scores). With chunk > 0 also each
        head's mass per chunk of positions [Hkv, G, ceil(N / chunk)]. With lse_state,
        one pass normalised by the previous step's region lse instead; with block > 1,
        the shares' sums per block of positions (summed in float32, stored in
        shares_dtype) instead of the shares (select_scores). query: self.query(layer, q),
        when the caller has it. tail_sums [Hkv, M, D]: the tail estimate's chunk term
        summed in the same pass, in place of the masses (select_scores). sm_share: the
        share of the GPU's SMs the pass's grid is sized for (select_scores; the reference
        has no grid)."""
        query = self.query(layer, q) if query is None else query
        # with the query made, select_scores reads the basis for its shape only
        args = (q, self.basis[layer], self.mean[layer], self.keys[layer], lo, hi, scale,
                other_lse, chunk, shares_dtype, lse_state, block, query, tail_sums)
        # the Triton kernel on a GPU; elsewhere its reference (not the interpreter, which
        # tests may have switched on for the whole process)
        if self.keys.is_cuda:
            return select_scores(*args, sm_share=sm_share)
        return select_scores_ref(*args)

    def memory_bytes(self) -> dict[str, int]:
        parts = (self.mean, self.basis, self.keys) + ((self.scale,) if self.sketch != "auto"
                                                      else ())
        n = sum(t.numel() * t.element_size() for t in parts)
        return {"gpu" if self.keys.is_cuda else "host": n}

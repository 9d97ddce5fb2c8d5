"""Triton kernels, each beside its plain-PyTorch reference.

Each kernel is a folder: `__init__.py` (public function: checks shapes, dtypes, strides and
picks the grid), `kernel.py` (@triton.jit code), `ref.py` (readable float32 PyTorch, same
signature and layout). Triton is imported only when a kernel first runs, so importing this
package needs torch alone; without CUDA and without TRITON_INTERPRET=1 the public functions
fall back to their references.
"""

from .append_token import (
    SketchLayer,
    TailLayer,
    add_to_tail,
    append_token,
    append_token_ref,
    sketch_rows,
    sketch_storage,
)
from .gather_kv import dequantize_rows, gather_k, gather_kv, gather_kv_ref, quantize_rows
from .guess_query import GuessWeights, guess_query, guess_query_ref, quantize_guess
from .rerank_shares import rerank_shares, rerank_shares_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rope import rope, rope_ref
from .select_scores import (
    KEY_BITS,
    LseState,
    block_sums_ref,
    kernel_scores,
    pack_int4,
    quantise_query,
    select_scores,
    select_scores_ref,
    sketch_values,
    unpack_int4,
)
from .select_topk import (
    select_topk,
    select_topk_ref,
    select_topk_values,
    select_topk_values_ref,
    topk_indices,
)
from .sketch_query import (
    SketchQuery,
    sketch_query,
    sketch_query_ref,
    sketch_scores_at,
    sketch_scores_at_ref,
)
from .sparse_attention import sparse_attention, sparse_attention_ref
from .store_kv import store_kv, store_kv_ref
from .tail_correct import (
    ChunkTail,
    TailPartials,
    chunk_tail_ref,
    guess_lse_ref,
    tail_correct,
    tail_correct_ref,
    tail_merge,
    tail_partials,
)
from .window_lse import window_lse, window_lse_ref

__all__ = [
    "add_to_tail", "append_token", "append_token_ref", "block_sums_ref", "dequantize_rows",
    "gather_k", "gather_kv", "gather_kv_ref", "guess_lse_ref", "guess_query",
    "guess_query_ref", "GuessWeights", "kernel_scores", "KEY_BITS",
    "LseState", "pack_int4", "quantise_query", "quantize_guess", "quantize_rows",
    "rerank_shares", "rerank_shares_ref", "rms_norm", "rms_norm_ref", "rope", "rope_ref",
    "select_scores", "select_scores_ref", "select_topk", "select_topk_ref", "select_topk_values",
    "select_topk_values_ref", "sketch_query",
    "sketch_query_ref", "sketch_rows", "sketch_scores_at", "sketch_scores_at_ref",
    "sketch_storage", "sketch_values", "SketchLayer", "SketchQuery", "sparse_attention",
    "sparse_attention_ref", "store_kv", "store_kv_ref", "tail_correct", "tail_correct_ref",
    "tail_merge", "tail_partials", "TailLayer", "TailPartials", "ChunkTail", "chunk_tail_ref",
    "topk_indices", "unpack_int4",
    "window_lse", "window_lse_ref",
]

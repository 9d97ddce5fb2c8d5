"""PromptIngest: a prompt's K, V into a SparseKV's parts (prefill's layers, or ingest).

Prefill runs exact attention over a transient dense cache of one layer on the device
(`scratch`); as each layer is done its K, V go to the store, the window, the tail's chunk
sums and the retriever's index (the sketch's PCA, or Quest's pages), one sequence of the
batch at a time. SparseKV.ingest / ingest_layers hand over a prompt's K, V from elsewhere
(a saved context, a benchmark's synthetic fill) through the same write_layer.
"""

from __future__ import annotations

import torch

from retrieval_attn.index.quest import QuestRetriever
from retrieval_attn.offload.dense import DenseKV
from retrieval_attn.offload.kv_store import KVStore
from retrieval_attn.offload.lowrank import LowRankKeys
from retrieval_attn.offload.policy import AttnStep
from retrieval_attn.offload.tail import TailEstimate
from retrieval_attn.offload.window import WindowCache


class PromptIngest:
    """The prefill scratch of the sequence being prefilled, and the hand-over of a
    prompt's layers to the parts that keep them (None where a policy has no such part)."""

    def __init__(self, store: KVStore, sketch: LowRankKeys | None, tail: TailEstimate | None,
                 quest: QuestRetriever | None, num_kv_heads: int, batch: int,
                 max_tokens: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.store, self.sketch, self.tail, self.quest = store, sketch, tail, quest
        self.Hkv, self.B, self.max_tokens, self.D = num_kv_heads, batch, max_tokens, head_dim
        self.device, self.dtype = device, dtype
        self.seq = 0  # the sequence being prefilled
        self.scratch: DenseKV | None = None  # its K, V [1, 1, Hkv, N, D] of one layer

    @property
    def prefilling(self) -> bool:
        return self.scratch is not None

    def start(self, seq: int) -> None:
        """Prefill of sequence seq comes next. Exact attention needs one layer's full K, V
        on the device (prefill runs layer-major); finish_layer hands each over."""
        self.seq = seq
        self.scratch = DenseKV(1, 1, self.Hkv, self.max_tokens, self.D, self.device,
                               self.dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               step: AttnStep) -> torch.Tensor:
        """Prefill: exact attention of q [1, H, T, D] over the scratch with k, v
        [1, Hkv, T, D] written in -> [1, H, T, D]."""
        return self.scratch.attend(0, q, k, v, step)

    def finish_layer(self, layer: int, n: int, window: WindowCache) -> None:
        """The scratch's n tokens of this layer into the parts, as sequence seq's."""
        kv = self.scratch
        self.write_layer(layer, kv.k[0, 0, :, :n], kv.v[0, 0, :, :n], window, self.seq)

    def finish(self) -> None:
        self.scratch = None  # the dense scratch is freed here

    def write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, window: WindowCache,
                    seq: int | None = None, fit_sketch: bool = True) -> None:
        """One layer's prompt K, V: store, window, tail sums, retriever index. k, v
        [Hkv, n, D] of sequence seq, or [B·Hkv, n, D] of every sequence when seq is None.
        fit_sketch False: a saved context's layer, whose sketch comes saved
        (LowRankKeys.load_state); the rest is cheap to redo."""
        if seq is None and self.B > 1:  # one sequence at a time: bounds the fit's temporaries
            for s in range(self.B):
                rows = slice(s * self.Hkv, (s + 1) * self.Hkv)
                self.write_layer(layer, k[rows], v[rows], window, s, fit_sketch)
            return
        rows = slice(None) if seq is None else slice(seq * self.Hkv, (seq + 1) * self.Hkv)
        self.store.write(layer, 0, k, v, rows)
        window.load(layer, k, v, rows)
        if self.tail is not None:
            self.tail.build(layer, v, rows)
        if self.sketch is not None:
            if fit_sketch:
                self.sketch.build(layer, k, rows)
        elif self.quest is not None:
            self.quest.build(layer, k, rows)

    def memory_bytes(self) -> dict[str, int]:
        return self.scratch.memory_bytes() if self.scratch is not None else {}

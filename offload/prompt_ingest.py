"""PromptIngest: a prompt's K, V handed to SparseKV (prefill's layers, or ingest).

Prefill runs exact attention over a transient dense cache of one layer on the device
(prefill_kv); as each layer is done its K, V go to the host store, the window, the tail's
chunk sums and the selector's index (the sketch's PCA, or Quest's pages), one sequence of
the batch at a time. `ingest` / `ingest_layers` take a prompt's K, V from elsewhere (a
saved context, a benchmark's synthetic fill) the same way. SparseKV holds the state
(store, window, sketch, tail, selector, prefill_kv, cfg, ann); this class is its methods
on it.
"""

from __future__ import annotations

import torch

from retrieval_attn.errors import RequestError
from retrieval_attn.index.quest import QuestRetriever
from retrieval_attn.index.retriever import LowRankRetriever
from retrieval_attn.offload.dense import DenseKV
from retrieval_attn.offload.policy import AttnStep
from retrieval_attn.offload.window import WindowCache


class PromptIngest:
    """Mixed into SparseKV: its prompt's K, V into its state (module docstring)."""

    def start_request(self, prompt_tokens: int | None = None, seq: int = 0) -> None:
        """Prefill of sequence seq of the batch comes next (seq 0 starts a new batch)."""
        if not 0 <= seq < self.B:
            raise ValueError(f"sequence {seq} of a batch of {self.B}")
        if seq > 0 and prompt_tokens not in (None, self.prompt_tokens):
            raise RequestError(f"batched prompts decode in lockstep and must have one "
                               f"length: sequence 0 has {self.prompt_tokens} tokens, "
                               f"sequence {seq} {prompt_tokens}")
        self.seq = seq
        # Exact attention during prefill needs one layer's full K, V on the device (prefill
        # runs layer-major); each layer's is handed over to the host store when it is done.
        self.prefill_kv = DenseKV(1, 1, self.Hkv, self.max_tokens, self.D, self.device,
                                  self.dtype)
        if self.ann is not None:
            self._reset_index(prompt_tokens or self.max_tokens)

    def finish_layer(self, layer: int, n: int) -> None:
        if layer == 0 and self.seq == 0:
            self._begin(n)
        kv = self.prefill_kv
        self.ingest_layer(layer, kv.k[0, 0, :, :n], kv.v[0, 0, :, :n], self.seq)
        if self.ann is not None:
            self._submit_build(layer, n)

    def finish_prefill(self, n: int) -> None:
        self.prefill_kv = None  # the dense scratch is freed here
        if self.builder is not None:
            self.install_ready()

    def ingest(self, k: torch.Tensor, v: torch.Tensor,
               queries: dict[int, torch.Tensor] | None = None) -> None:
        """Take a prompt's K, V [L, Hkv, n, D] (post-RoPE) as this policy's state.
        queries {layer: [H, n, D]}: the prompt's queries, for a host index to be built
        from (it is built now, and installed before this returns)."""
        n = k.shape[2]
        if k.shape[1] != self.B * self.Hkv:
            raise ValueError(f"ingest takes K, V [L, B·Hkv, n, D] of all {self.B} sequences "
                             f"({self.B * self.Hkv} rows); got {tuple(k.shape)}")
        with_q = self.ann is not None and queries is not None
        self.ingest_layers(((k[layer], v[layer]) + ((queries[layer],) if with_q else ())
                            for layer in range(self.L)), n)

    def ingest_layers(self, layers, n: int) -> None:
        """Like ingest, from an iterable of per-layer (k, v) [B·Hkv, n, D] (every
        sequence of the batch), or (k, v, q) with the layer's prompt queries q [H, n, D]
        for its host index: one layer at a time, so a caller never needs every layer's
        K, V at once. Host indexes are built as each layer arrives and installed before
        this returns."""
        if self.ann is not None:
            self._reset_index(n)
        self._begin(n)
        for layer, (k, v, *q) in enumerate(layers):
            self.ingest_layer(layer, k, v)
            if self.ann is not None and q:
                self._keep_queries(layer, q[0][None], AttnStep(torch.arange(n), 0))
                self._submit_build(layer, n)
        if self.ann is not None:
            self.install_ready(wait=True)

    def ingest_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                     seq: int | None = None) -> None:
        """One layer's prompt K, V: host store, window, selector index. k, v [Hkv, n, D]
        of sequence seq, or [B·Hkv, n, D] of every sequence when seq is None."""
        if seq is None and self.B > 1:  # one sequence at a time: bounds the fit's temporaries
            for s in range(self.B):
                rows = slice(s * self.Hkv, (s + 1) * self.Hkv)
                self.ingest_layer(layer, k[rows], v[rows], s)
            return
        rows = slice(None) if seq is None else slice(seq * self.Hkv, (seq + 1) * self.Hkv)
        self.store.write(layer, 0, k, v, rows)
        self.window.load(layer, k, v, rows)
        if self.tail is not None:
            self.tail.build(layer, v, rows)
        if self.sketch is not None:
            self.sketch.build(layer, k, rows)
        elif isinstance(self.selector, QuestRetriever):
            self.selector.build(layer, k, rows)

    def _begin(self, n: int) -> None:
        """A prompt of n tokens arrives: size the budget and a fresh window for it.
        Streaming spends the top_k budget on a longer window, so all policies attend the
        same number of tokens."""
        self.budget, self.prompt_tokens = self.cfg.budget(n), n
        extra = self.budget if self.cfg.policy == "streaming" else 0
        self.window = WindowCache(self.L, self.B * self.Hkv, self.cfg.sink_tokens,
                                  self.cfg.window_tokens + extra, self.D, self.device,
                                  self.dtype, with_slot=self.cfg.lookahead_from > 0)
        # The offloaded region [sinks, pos + 1 - W) only grows while decoding: what it
        # holds at the first step settles how every step selects (a CUDA graph is
        # captured per prompt).
        region = n + 1 - self.window.W - self.cfg.sink_tokens
        for sel in (self.selector, getattr(self.selector, "fallback", None)):
            if isinstance(sel, LowRankRetriever):
                sel.prepare(region, self.budget)
        self.state_version += 1

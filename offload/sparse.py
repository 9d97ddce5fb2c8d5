"""SparseKV: decode attention over sinks + window + selected past tokens, one softmax.

Prefill is exact (a transient dense cache on the device). When the prompt is done, its
K, V move to the host store, the window keeps sinks and recent tokens on the device, and
the selector (low-rank retriever, Quest pages, or none for streaming) indexes the keys.
Each decode step then attends over window ∪ selected with one kernel call.

A batch of B sequences (of one prompt length, decoded in lockstep) is B·Hkv kv heads to
everything below the attention kernel: the store, window, sketch and selection hold rows
[B·Hkv] (sequence b's heads at rows b·Hkv .. b·Hkv + Hkv - 1, each with its own PCA basis),
so the selection and gather kernels need no batch dimension. Prompts are prefilled one
sequence at a time (start_request(n, seq=b)).

With a host index (index.kind other than lowrank), a sample of each layer's prefill
queries is kept on the host, and when the layer's prefill is done its keys and queries go
to the IndexBuildService; built indexes are installed between decode steps, and until
then the layer is served by the low-rank retriever.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from retrieval_attn.config import IndexConfig, KVConfig
from retrieval_attn.index.ann_retriever import AnnRetriever
from retrieval_attn.index.build_service import IndexBuildService
from retrieval_attn.index.quest import QuestRetriever
from retrieval_attn.index.retriever import LowRankRetriever
from retrieval_attn.kernels.append_token import append_token, append_token_ref, window_slot
from retrieval_attn.kernels.gather_kv import gather_k, gather_kv, gather_kv_ref
from retrieval_attn.kernels.sparse_attention import sparse_attention, sparse_attention_ref
from retrieval_attn.kernels.window_lse import window_lse, window_lse_ref
from retrieval_attn.offload.dense import DenseKV
from retrieval_attn.offload.host_index import HostIndexFeed
from retrieval_attn.offload.kv_store import KVStore, StoreRows
from retrieval_attn.offload.lookahead import Lookahead, LookaheadSelect
from retrieval_attn.offload.lowrank import LowRankKeys
from retrieval_attn.offload.policy import AttnStep
from retrieval_attn.offload.prompt_ingest import PromptIngest
from retrieval_attn.offload.tail import CHUNK as TAIL_CHUNK
from retrieval_attn.offload.tail import TailEstimate
from retrieval_attn.offload.window import WindowCache


@dataclass
class TraceEntry:
    """One layer of one decode step, kept for diagnostics against dense attention."""

    layer: int
    n: int  # tokens seen, including this one
    q: torch.Tensor  # [H, D]
    out: torch.Tensor  # [H, D]
    selected: torch.Tensor  # [Hkv, K] positions attended besides the window


class SparseKV(PromptIngest, HostIndexFeed, LookaheadSelect):
    layer_major = True  # a layer's K, V leave the device as soon as its prefill is done

    def __init__(self, cfg: KVConfig, num_layers: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, max_tokens: int, device: torch.device,
                 dtype: torch.dtype, index: IndexConfig | None = None,
                 progress: bool = False, batch: int = 1) -> None:
        # the config's rules (config.check_sections, check_for_shape) were checked, and
        # kv.rank resolved, by whoever made cfg and index into a policy (make_kv_policy)
        self.cfg = cfg
        self.L, self.H, self.Hkv, self.D = num_layers, num_heads, num_kv_heads, head_dim
        self.B, rows = batch, batch * num_kv_heads  # rows: the kv heads of every sequence
        self.seq = 0  # the sequence being prefilled
        self.max_tokens, self.device, self.dtype = max_tokens, device, dtype
        self.index_cfg = index or IndexConfig()
        on_device = cfg.store_on == "device"
        self.store = KVStore(num_layers, rows, max_tokens, head_dim, dtype,
                             pin=device.type == "cuda" and not on_device,
                             quantized=cfg.host_dtype == "int8", scale_device=device,
                             rows_device=device if on_device else None)
        self.sketch: LowRankKeys | None = None
        self.selector: LowRankRetriever | QuestRetriever | None = None
        if cfg.policy == "retrieval":
            self.sketch = LowRankKeys(num_layers, rows, max_tokens, head_dim,
                                      cfg.rank, device, dtype, cfg.sketch_dtype)
            self.selector = LowRankRetriever(self.sketch, head_dim, cfg.rerank_factor,
                                             self._exact_keys, cfg.select_block,
                                             reuse_lse=cfg.score_passes == 1,
                                             rerank_blocks=cfg.rerank_blocks)
            # hi = pos + 1 - W at most (_step_bounds): the last W positions stay in the window
            self.selector.region_end = max_tokens - cfg.window_tokens
            # a device store: attend gathers the chosen K with their V (one launch, not two)
            self.selector.chosen_keys = not on_device
        elif cfg.policy == "quest":
            self.selector = QuestRetriever(num_layers, rows, max_tokens, head_dim,
                                           cfg.page_tokens, device, dtype)
        # an int8 store in GPU memory: the attention reads the selected rows by index
        self.indexed_reads = (on_device and device.type == "cuda"
                              and cfg.host_dtype == "int8" and cfg.policy == "retrieval")
        self.ann: AnnRetriever | None = None
        self.builder: IndexBuildService | None = None
        if cfg.policy == "retrieval" and self.index_cfg.kind != "lowrank":
            ic = self.index_cfg
            self.ann = AnnRetriever(ic.kind, self.store.k, self.selector, head_dim,
                                    ic.search_ef, ic.search_threads)
            self.selector = self.ann
            self.builder = IndexBuildService(ic.kind, ic.builder, ic.ray_address,
                                             progress=progress)
        self.tail: TailEstimate | None = None
        if cfg.policy == "retrieval" and cfg.tail_estimate and self.ann is None:
            self.tail = TailEstimate(num_layers, rows, max_tokens, head_dim, device, dtype)
            self.selector.tail_chunk = TAIL_CHUNK
            if device.type == "cuda" and cfg.window_tokens >= TAIL_CHUNK:
                # the scoring pass sums the tail's chunk term itself (one read of the sums
                # and masses less); a window this long leaves every chunk with mass full
                self.selector.tail_sums = lambda layer: self.tail.sums[layer]
        self._queries: dict[int, list[torch.Tensor]] = {}  # layer -> [H, m, D] host chunks
        self.build_queries: dict[int, np.ndarray] = {}  # layer -> [Hkv, G·M, D]
        self.probe_queries: dict[int, list[torch.Tensor]] = {}  # layer -> [H, p, D] chunks
        self.query_stride = 1
        self.window: WindowCache | None = None
        self.prefill_kv: DenseKV | None = None
        self.budget = self.prompt_tokens = 0
        self.state_version = 0
        self.trace: list[TraceEntry] | None = None  # set to [] to record decode steps
        self._bounds_step: AttnStep | None = None  # the step _bounds were computed for
        self._bounds: tuple[torch.Tensor, torch.Tensor] | None = None
        self._side: torch.cuda.Stream | None = None  # the tail's partials run on it
        # kv.lookahead_from: what lookahead chose per layer, on its own stream
        self._ahead: dict[int, Lookahead] = {}
        self._ahead_stream: torch.cuda.Stream | None = None
        self._gather, self._attention = _ops(device)

    @property
    def graph_safe(self) -> bool:
        """Decode has fixed shapes and no host sync, so a CUDA graph may capture it; not
        while tracing, which reads positions on the host."""
        return self.trace is None and self.ann is None  # host search syncs every step

    # -- request lifecycle -------------------------------------------------------------
    # -- attention ---------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               step: AttnStep) -> torch.Tensor:
        if self.prefill_kv is not None:  # prefill: exact, one layer at a time
            if self.ann is not None:
                self._keep_queries(layer, q, step)
            return self.prefill_kv.attend(0, q, k, v, step)
        if self.builder is not None and layer == 0 and self.builder.pending:
            self.install_ready()
        B, rows = q.shape[0], q.shape[0] * self.Hkv
        if B != self.B or q.shape[2] != 1:
            raise NotImplementedError(f"sparse decode serves one token per step for each of "
                                      f"its {self.B} sequences; got q {tuple(q.shape)}")
        # Everything below stays on the device with fixed shapes (no host sync), so the
        # same code runs eagerly and inside a captured CUDA graph.
        pos = step.positions  # [1]: the sequences decode in lockstep
        k1, v1 = k.reshape(rows, 1, self.D), v.reshape(rows, 1, self.D)  # [B·Hkv, 1, D]
        self._append(layer, pos, k1[:, 0], v1[:, 0])
        if isinstance(self.selector, QuestRetriever):
            self.selector.append(layer, pos, k1)
        lo, (hi, window, _) = self.cfg.sink_tokens, self._step_bounds(layer, step)
        qg = q[:, :, 0].reshape(rows, self.H // self.Hkv, self.D)  # [B·Hkv, G, D]
        k_sel = guess_lse = ready = None
        # candidates chosen early for this step (lookahead); a step interrupted after its
        # lookahead leaves one for another step, which is dropped here
        ahead = self._ahead.pop(layer, None)
        if self.selector is None:
            sel = torch.zeros(rows, 0, dtype=torch.long, device=q.device)
            count = torch.zeros(1, dtype=torch.int32, device=q.device)
        elif ahead is not None and ahead.step is step:  # re-rank them
            sel, count, k_sel = self._join_lookahead(ahead, qg, hi)
            guess_lse = ahead.window_lse
            ready = ahead.ready  # final, and read with its tail on the side stream
        else:
            window_lse = self.window_lse(layer, qg, window)
            args = (layer, qg, lo, hi, self.budget, window_lse)
            if hasattr(self.selector, "select_with_keys"):  # re-ranking may have read K
                sel, count, k_sel = self.selector.select_with_keys(*args)
            else:
                sel, count = self.selector.select(*args)  # [B·Hkv, K], [1]
        if ready is not None:
            k_sel, v_sel, finish_tail = ready
        else:
            finish_tail = self._start_tail(layer, sel, count, pos, guess_lse)
            if k_sel is None:
                k_sel, v_sel = self._read_selected(layer, sel)
            else:  # values only: half the host reads (a host store; selector.chosen_keys)
                v_sel = self._gather_rows(self.store.layer_rows(layer)[1], sel)
        out, lse = self._attend_selected(layer, q[:, :, 0], window, sel, count, k_sel, v_sel)
        if finish_tail is not None:
            G = qg.shape[1]
            out = finish_tail(out.reshape(rows, G, self.D), lse.reshape(rows, G)
                              ).reshape(out.shape)
        if self.trace is not None:
            n = int(pos[0]) + 1
            self.trace.append(TraceEntry(layer, n, q[0, :, 0].clone(), out[0].clone(),
                                         sel[:self.Hkv, :int(count[0])]))  # sequence 0
        return out[:, :, None]  # [B, H, 1, D]

    def _append(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The decode token's k, v [B·Hkv, D] into the store, window, tail sums and sketch:
        one fused kernel on a GPU; its reference elsewhere (not the interpreter)."""
        fn = append_token if k.is_cuda else append_token_ref
        keys, values = self.store.layer_rows(layer)
        fn(pos, k, v, (keys.rows, values.rows),
           (self.window.k[layer], self.window.v[layer]), self.window.S,
           self.tail.layer(layer) if self.tail is not None else None,
           self.sketch.layer(layer) if self.sketch is not None else None,
           None if keys.scale is None else (keys.scale, values.scale))

    def _per_seq(self, x: torch.Tensor) -> torch.Tensor:
        """[B·Hkv, N, D] -> [B, Hkv, N, D] (a view)."""
        return x.view(self.B, self.Hkv, *x.shape[1:])

    def _attend_selected(self, layer: int, q: torch.Tensor, window: torch.Tensor,
                         sel: torch.Tensor, count: torch.Tensor, k_sel: torch.Tensor | None,
                         v_sel: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q [B, H, D] over the window's filled slots and the selected
        positions sel [B·Hkv, K] (count [1] of them real) -> out [B, H, D], lse [B, H]:
        their K, V [B·Hkv, K, D] as read, or None where the attention reads them from the
        store itself (_read_selected)."""
        B, per_seq = self.B, self._per_seq
        wk, wv = per_seq(self.window.k[layer]), per_seq(self.window.v[layer])
        if k_sel is not None:
            return self._attention(q, wk, wv, window.expand(B), per_seq(k_sel),
                                   per_seq(v_sel), count.expand(B))
        keys, values = self.store.layer_rows(layer)
        return self._attention(q, wk, wv, window.expand(B), per_seq(keys.rows),
                               per_seq(values.rows), count.expand(B), idx_b=per_seq(sel),
                               scales_b=(per_seq(keys.scale), per_seq(values.scale)))

    def _read_selected(self, layer: int, sel: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """K, V [B·Hkv, K, D] of the selected positions sel [B·Hkv, K], in the model's
        dtype (an int8 store's rows times their scales): one gather launch. (None, None)
        for an int8 store in GPU memory: the attention kernel reads those rows by index
        and dequantises them in registers (no gathered copy written and read back)."""
        if self.indexed_reads:
            return None, None
        keys, values = self.store.layer_rows(layer)
        quantized = keys.scale is not None
        return self._gather(keys.rows, values.rows, sel,
                            scales=(keys.scale, values.scale) if quantized else None,
                            dtype=self.dtype if quantized else None)

    def _tail_parts(self, layer: int, sel: torch.Tensor, count: torch.Tensor,
                    pos: torch.Tensor, guess_window_lse: torch.Tensor | None = None
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """The tail estimate of this step (offload/tail.py), started on the current stream
        -> merge(out, lse) of the exact part (out [B·Hkv, G, D], lse [B·Hkv, G]), or None
        without a tail or a scored sketch this step. The sketch's mass per chunk came from
        the selection's own scoring pass.

        Where a guess at the query scored the sketch (lookahead; guess_window_lse [B·Hkv,
        G] its window lse), the tail's weight against the exact part comes from the guess
        alone (TailEstimate.start)."""
        if not self._tail_scored():
            return None
        s = self.selector
        scores = self.sketch.scores_at(layer, s.last_query, sel)  # [R, G, K]
        return self.tail.start(layer, s.last_mass, s.last_total, sel, scores, count, pos,
                               self.D**-0.5, guess_window_lse)

    def _tail_scored(self) -> bool:
        """Whether this step has a tail to estimate: the selection scored the sketch."""
        return (self.tail is not None and self.selector.last_total is not None
                and self.selector.last_mass is not None)

    def _start_tail(self, layer: int, sel: torch.Tensor, count: torch.Tensor,
                    pos: torch.Tensor, guess_window_lse: torch.Tensor | None = None
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """_tail_parts on a side stream (on a GPU), beside the value gather (host reads,
        which leave the SMs idle); the merge it returns joins that stream first (the fork
        and join are captured by a CUDA graph too)."""
        if not sel.is_cuda:
            return self._tail_parts(layer, sel, count, pos, guess_window_lse)
        if not self._tail_scored():
            return None
        main = torch.cuda.current_stream()
        if self._side is None:
            self._side = torch.cuda.Stream(sel.device)
        side = self._side
        side.wait_stream(main)
        with torch.cuda.stream(side):
            merge = self._tail_parts(layer, sel, count, pos, guess_window_lse)

        def finish(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
            main.wait_stream(side)
            return merge(out, lse)

        return finish

    def _step_bounds(self, layer: int, step: AttnStep
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hi, filled window slots, the step's token's window slot), [1] each on the
        device: the end of the offloaded region, the window's filled slots once this
        step's token is in, and (for lookahead only, else None) the slot it goes to. They
        depend on the position alone, so layer 0 computes them and later layers of the
        step reuse them (a step object seen first at a later layer computes them there)."""
        if layer == 0 or self._bounds_step is not step:
            pos = step.positions
            newest = (window_slot(pos, self.window.S, self.window.W)
                      if self.cfg.lookahead_from else None)
            self._bounds = (torch.clamp(pos + 1 - self.window.W, min=self.cfg.sink_tokens),
                            self.window.valid_slots(pos), newest)
            self._bounds_step = step
        return self._bounds

    def window_lse(self, layer: int, qg: torch.Tensor, filled: torch.Tensor,
                   skip: torch.Tensor | None = None) -> torch.Tensor:
        """Log-sum-exp [B·Hkv, G] of the scaled scores over the filled window slots, but
        slot skip [1] when given (the Triton kernel on a GPU; its reference elsewhere, not
        the interpreter)."""
        fn = window_lse if qg.is_cuda else window_lse_ref
        return fn(qg, self.window.k[layer], filled, self.D**-0.5, skip)

    def _exact_keys(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        return self._gather_rows(self.store.layer_rows(layer)[0], positions)  # [Hkv, C, D]

    def _gather_rows(self, src: StoreRows, positions: torch.Tensor) -> torch.Tensor:
        """One layer of K or of V, rows at positions [Hkv, C] -> [Hkv, C, D] in the
        model's dtype. The kernel on a GPU, else its reference (not the interpreter, which
        tests may have switched on for the whole process: it made every CPU retrieval
        decode of the test suite ~5x slower)."""
        dtype = None if src.scale is None else self.dtype
        if positions.is_cuda:
            return gather_k(src.rows, positions, scale=src.scale, dtype=dtype)
        scales = None if src.scale is None else (src.scale, src.scale)
        return gather_kv_ref(src.rows, src.rows, positions, scales=scales,
                                     dtype=dtype)[0]

    def memory_bytes(self) -> dict[str, int]:
        parts = [self.store.memory_bytes()]
        for part in (self.window, self.sketch, self.tail,
                     self.selector if self.sketch is None else None):
            if part is not None and hasattr(part, "memory_bytes"):
                parts.append(part.memory_bytes())
        if self.prefill_kv is not None:
            parts.append(self.prefill_kv.memory_bytes())
        if self.ann is not None:  # index graphs and the libraries' key copies, on the host
            parts.append({"host": sum(sum(ix.nbytes().values())
                                      for ix in self.ann.layers.values())})
        total: dict[str, int] = {}
        for p in parts:
            for place, nbytes in p.items():
                total[place] = total.get(place, 0) + nbytes
        return total


def _ops(device: torch.device):
    """The Triton kernels on a GPU; their PyTorch references elsewhere."""
    if device.type == "cuda":
        return gather_kv, sparse_attention
    return gather_kv_ref, sparse_attention_ref

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

SparseKV owns its parts, each in its own file: the store of every token's K, V
(kv_store.py), the window of sinks and recent tokens (window.py), the sketch of every key
(lowrank.py), the tail estimate (tail.py), a retriever (index/: LowRankRetriever,
QuestRetriever, or AnnRetriever over host indexes), the prompt's hand-over (prompt_ingest.py),
the host index builds (host_index.py) and lookahead (lookahead.py). This file is the
policy: what a prompt and a decode step do with them.

With a host index (index.kind other than lowrank), a sample of each layer's prefill
queries is kept on the host, and when the layer's prefill is done its keys and queries go
to the IndexBuildService; built indexes are installed between decode steps, and until
then the layer is served by the low-rank retriever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from retrieval_attn.config import IndexConfig, KVConfig
from retrieval_attn.errors import RequestError
from retrieval_attn.index.ann_retriever import AnnRetriever
from retrieval_attn.index.base import Selection
from retrieval_attn.index.quest import QuestRetriever
from retrieval_attn.index.retriever import Candidates, LowRankRetriever
from retrieval_attn.kernels.append_token import append_token, append_token_ref
from retrieval_attn.kernels.sparse_attention import sparse_attention, sparse_attention_ref
from retrieval_attn.offload.host_index import HostIndexFeed
from retrieval_attn.offload.kv_store import KVStore
from retrieval_attn.offload.lookahead import AheadChoice, Lookahead, Ready
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


class SparseKV:
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
        self.max_tokens, self.device, self.dtype = max_tokens, device, dtype
        self.index_cfg = index or IndexConfig()
        on_device = cfg.store_on == "device"
        self.store = KVStore(num_layers, rows, max_tokens, head_dim, dtype,
                             pin=device.type == "cuda" and not on_device,
                             quantized=cfg.host_dtype == "int8", scale_device=device,
                             rows_device=device if on_device else None)
        self.window: WindowCache | None = None  # made for each prompt (begin_prompt)
        self.sketch: LowRankKeys | None = None
        self.tail: TailEstimate | None = None
        if cfg.policy == "retrieval":
            self.sketch = LowRankKeys(num_layers, rows, max_tokens, head_dim,
                                      cfg.rank, device, dtype, cfg.sketch_dtype)
            if cfg.tail_estimate and self.index_cfg.kind == "lowrank":
                self.tail = TailEstimate(num_layers, rows, max_tokens, head_dim, device, dtype)
        self.index_feed: HostIndexFeed | None = None
        self._make_retrievers(progress)
        # an int8 store in GPU memory: the attention reads the selected rows by index
        self.indexed_reads = (on_device and device.type == "cuda"
                              and cfg.host_dtype == "int8" and cfg.policy == "retrieval")
        self.prompt_ingest = PromptIngest(self.store, self.sketch, self.tail, self.quest,
                                          num_kv_heads, batch, max_tokens, head_dim, device,
                                          dtype)
        # kv.lookahead_from: layers choosing their candidates early, on a side stream
        self.ahead: Lookahead | None = None
        if cfg.lookahead_from and self.lowrank is not None and self.selector is self.lowrank:
            self.ahead = Lookahead(cfg.lookahead_from, device)
        self.budget = self.prompt_tokens = 0
        self.state_version = 0
        self.trace: list[TraceEntry] | None = None  # set to [] to record decode steps
        self._attention = sparse_attention if device.type == "cuda" else sparse_attention_ref

    def _make_retrievers(self, progress: bool) -> None:
        """The retrievers kv.policy and index.kind name, and `selector`, the one that
        answers each decode step (None: streaming attends sinks and window only). A host
        index (AnnRetriever, fed by a HostIndexFeed) falls back on the low-rank one."""
        cfg, ic = self.cfg, self.index_cfg
        self.lowrank: LowRankRetriever | None = None
        self.quest: QuestRetriever | None = None
        self.ann: AnnRetriever | None = None
        self.selector: LowRankRetriever | QuestRetriever | AnnRetriever | None = None
        if cfg.policy == "quest":
            self.quest = self.selector = QuestRetriever(
                self.L, self.B * self.Hkv, self.max_tokens, self.D, cfg.page_tokens,
                self.device, self.dtype)
        if cfg.policy != "retrieval":
            return
        self.lowrank = self.selector = self._lowrank_retriever()
        if ic.kind != "lowrank":
            self.ann = self.selector = AnnRetriever(ic.kind, self.store.k, self.lowrank,
                                                    self.D, ic.search_ef, ic.search_threads)
            self.index_feed = HostIndexFeed(ic, self.ann, self.store, self.Hkv, self.D,
                                            cfg.sink_tokens, cfg.window_tokens, progress)

    def _lowrank_retriever(self) -> LowRankRetriever:
        cfg, tail = self.cfg, self.tail
        return LowRankRetriever(
            self.sketch, self.D, cfg.rerank_factor, self.store.gather_keys, cfg.select_block,
            reuse_lse=cfg.score_passes == 1, rerank_blocks=cfg.rerank_blocks,
            # hi = pos + 1 - W at most (WindowCache.step_bounds): the last W positions
            # stay in the window
            region_end=self.max_tokens - cfg.window_tokens,
            # a device store: attend gathers the chosen K with their V (one launch)
            chosen_keys=cfg.store_on != "device",
            tail_chunk=TAIL_CHUNK if tail is not None else 0,
            # the scoring pass sums the tail's chunk term itself (one read of the sums and
            # masses less); a window this long leaves every chunk with mass full
            tail_sums=(tail.sums if tail is not None and self.device.type == "cuda"
                       and cfg.window_tokens >= TAIL_CHUNK else None))

    @property
    def graph_safe(self) -> bool:
        """Decode has fixed shapes and no host sync, so a CUDA graph may capture it; not
        while tracing, which reads positions on the host."""
        return self.trace is None and self.ann is None  # host search syncs every step

    # -- a prompt -------------------------------------------------------------------------
    def start_request(self, prompt_tokens: int | None = None, seq: int = 0) -> None:
        """Prefill of sequence seq of the batch comes next (seq 0 starts a new batch)."""
        if not 0 <= seq < self.B:
            raise ValueError(f"sequence {seq} of a batch of {self.B}")
        if seq > 0 and prompt_tokens not in (None, self.prompt_tokens):
            raise RequestError(f"batched prompts decode in lockstep and must have one "
                               f"length: sequence 0 has {self.prompt_tokens} tokens, "
                               f"sequence {seq} {prompt_tokens}")
        self.prompt_ingest.start(seq)
        if self.index_feed is not None:
            self.index_feed.reset(prompt_tokens or self.max_tokens)

    def finish_layer(self, layer: int, n: int) -> None:
        seq = self.prompt_ingest.seq
        if layer == 0 and seq == 0:
            self.begin_prompt(n)
        self.prompt_ingest.finish_layer(layer, n, self.window)
        if self.index_feed is not None:
            self.index_feed.submit_build(layer, n)

    def finish_prefill(self, n: int) -> None:
        self.prompt_ingest.finish()
        if self.index_feed is not None:
            self.install_ready()

    def ingest(self, k: torch.Tensor, v: torch.Tensor,
               queries: dict[int, torch.Tensor] | None = None) -> None:
        """Take a prompt's K, V [L, B·Hkv, n, D] (post-RoPE) as this policy's state.
        queries {layer: [H, n, D]}: the prompt's queries, for a host index to be built
        from (it is built now, and installed before this returns)."""
        n = k.shape[2]
        if k.shape[1] != self.B * self.Hkv:
            raise ValueError(f"ingest takes K, V [L, B·Hkv, n, D] of all {self.B} sequences "
                             f"({self.B * self.Hkv} rows); got {tuple(k.shape)}")
        with_q = self.index_feed is not None and queries is not None
        self.ingest_layers(((k[layer], v[layer]) + ((queries[layer],) if with_q else ())
                            for layer in range(self.L)), n)

    def ingest_layers(self, layers: Iterable[tuple[torch.Tensor, ...]], n: int) -> None:
        """Like ingest, from an iterable of per-layer (k, v) [B·Hkv, n, D] (every
        sequence of the batch), or (k, v, q) with the layer's prompt queries q [H, n, D]
        for its host index: one layer at a time, so a caller never needs every layer's
        K, V at once. Host indexes are built as each layer arrives and installed before
        this returns."""
        feed = self.index_feed
        if feed is not None:
            feed.reset(n)
        self.begin_prompt(n)
        for layer, (k, v, *q) in enumerate(layers):
            self.ingest_layer(layer, k, v)
            if feed is not None and q:
                feed.keep_queries(layer, q[0][None], AttnStep(torch.arange(n), 0))
                feed.submit_build(layer, n)
        if feed is not None:
            self.install_ready(wait=True)

    def ingest_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                     seq: int | None = None) -> None:
        """One layer's prompt K, V: store, window, retriever index. k, v [Hkv, n, D] of
        sequence seq, or [B·Hkv, n, D] of every sequence when seq is None."""
        self.prompt_ingest.write_layer(layer, k, v, self.window, seq)

    def restore_prompt(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """A saved prompt's K, V [L, B·Hkv, n, D] (post-RoPE, on the host) as this policy's
        state, after start_request(n): all of it but what comes saved on its own (the
        sketch: self.sketch.load_state; host indexes: self.index_feed). finish_prefill
        comes next."""
        self.begin_prompt(k.shape[2])
        for layer in range(self.L):
            self.prompt_ingest.write_layer(layer, k[layer], v[layer], self.window,
                                           fit_sketch=False)

    def begin_prompt(self, n: int) -> None:
        """A prompt of n tokens arrives: size the budget and a fresh window for it (its
        K, V come next, layer by layer). Streaming spends the top_k budget on a longer
        window, so all policies attend the same number of tokens."""
        self.budget, self.prompt_tokens = self.cfg.budget(n), n
        if self.index_feed is not None:
            self.index_feed.begin(n)
        extra = self.budget if self.cfg.policy == "streaming" else 0
        self.window = WindowCache(self.L, self.B * self.Hkv, self.cfg.sink_tokens,
                                  self.cfg.window_tokens + extra, self.D, self.device,
                                  self.dtype, with_slot=self.cfg.lookahead_from > 0)
        # The offloaded region [sinks, pos + 1 - W) only grows while decoding: what it
        # holds at the first step settles how every step selects (a CUDA graph is
        # captured per prompt).
        region = n + 1 - self.window.W - self.cfg.sink_tokens
        if self.lowrank is not None:
            self.lowrank.prepare(region, self.budget)
        self.state_version += 1

    def install_ready(self, wait: bool = False) -> list[int]:
        """Install the layers whose host index builds are done -> their layer numbers."""
        return self.index_feed.install_ready(wait)

    # -- decode -------------------------------------------------------------------------
    def lookahead(self, layer: int, guess: Callable[[], torch.Tensor], step: AttnStep
                  ) -> None:
        """Choose layer's re-rank candidates now, with guess() -> q [B, H, 1, D] (its
        queries as computed from layer - 1's input), for attend(layer) to re-rank with the
        real ones (kv.lookahead_from; offload/policy.py, offload/lookahead.py). On a GPU
        it all runs on a side stream beside layer - 1: the sketch scoring (HBM-bound)
        beside layer - 1's value reads from the host, then the top-k and the host reads of
        the candidates' keys beside its MLP. The window's lse leaves out this step's token
        (not written yet), and the layer's tail estimate is the guess's: approximations of
        the guess, checked against dense attention (docs/results.md). Without a re-rank
        (kv.rerank_factor 1) the guess's choice is final: the side stream then also reads
        the chosen K, V and computes the tail's partial sums, and attend(layer) is left
        the attention and the merges."""
        if (not self.prompt_ingest.prefilling and self.ahead is not None
                and self.ahead.covers(layer)):
            self.ahead.start(layer, lambda: self._choose_early(layer, guess, step))

    def _choose_early(self, layer: int, guess: Callable[[], torch.Tensor], step: AttnStep
                      ) -> AheadChoice:
        q = guess()  # [B, H, 1, D]
        qg = q[:, :, 0].reshape(q.shape[0] * self.Hkv, self.H // self.Hkv, self.D)
        # the slot this step's token goes to holds an older token until attend(layer) (or
        # already this one, when a graph's capture repeats the step): left out
        hi, window, newest = self.window.step_bounds(layer, step)
        window_lse = self.window.lse(layer, qg, window, newest)  # [B·Hkv, G]
        found = self.lowrank.candidates(layer, qg, self.cfg.sink_tokens, hi, self.budget,
                                        window_lse, self.cfg.lookahead_sm_share)
        ready = None
        if not isinstance(found, Candidates):  # final: read it and start its tail now
            keys, values = self._read_selected(layer, found.positions)
            merge = (self.tail.estimate(layer, found, self.sketch, step.positions, window_lse)
                     if self.tail is not None else None)
            ready = Ready(keys, values, merge)
        return AheadChoice(step, found, window_lse, ready)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               step: AttnStep) -> torch.Tensor:
        if self.prompt_ingest.prefilling:  # prefill: exact, one layer at a time
            if self.index_feed is not None:
                self.index_feed.keep_queries(layer, q, step)
            return self.prompt_ingest.attend(q, k, v, step)
        if self.index_feed is not None and layer == 0 and self.index_feed.pending:
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
        if self.quest is not None:
            self.quest.append(layer, pos, k1)
        hi, window, _ = self.window.step_bounds(layer, step)
        qg = q[:, :, 0].reshape(rows, self.H // self.Hkv, self.D)  # [B·Hkv, G, D]
        found, guess_lse, ready = self._select(layer, qg, hi, window, step)
        sel, count = found.positions, found.count  # [B·Hkv, K], [1]
        if ready is not None:  # a final lookahead read them, and began their tail
            k_sel, v_sel, finish_tail = ready.keys, ready.values, ready.merge
        else:
            finish_tail = (self.tail.estimate_beside(layer, found, self.sketch, pos, guess_lse)
                           if self.tail is not None else None)
            k_sel = found.keys
            if k_sel is None:
                k_sel, v_sel = self._read_selected(layer, sel)
            else:  # values only: half the host reads (a host store; selector.chosen_keys)
                v_sel = self.store.gather_values(layer, sel)
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

    def _select(self, layer: int, qg: torch.Tensor, hi: torch.Tensor, window: torch.Tensor,
                step: AttnStep) -> tuple[Selection, torch.Tensor | None, Ready | None]:
        """This step's selection for qg [B·Hkv, G, D] from the offloaded region [sinks,
        hi) -> (the retriever's Selection; where lookahead chose the candidates, the
        guess's window lse [B·Hkv, G] and, for a final choice, what it read). Without a
        retriever: no positions."""
        rows = qg.shape[0]
        if self.selector is None:
            return Selection(torch.zeros(rows, 0, dtype=torch.long, device=qg.device),
                             torch.zeros(1, dtype=torch.int32, device=qg.device)), None, None
        ahead = self.ahead.take(layer, step) if self.ahead is not None else None
        if ahead is not None:  # re-rank them (their sketch scores are the guess's)
            found = ahead.found
            if isinstance(found, Candidates):
                found = self.lowrank.rerank(qg, hi, found)
            return found, ahead.window_lse, ahead.ready
        window_lse = self.window.lse(layer, qg, window)  # [B·Hkv, G]
        found = self.selector.select(layer, qg, self.cfg.sink_tokens, hi, self.budget,
                                     window_lse)
        return found, None, None

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
        dtype (KVStore.gather). (None, None) for an int8 store in GPU memory: the
        attention kernel reads those rows by index and dequantises them in registers (no
        gathered copy written and read back)."""
        if self.indexed_reads:
            return None, None
        return self.store.gather(layer, sel)

    def memory_bytes(self) -> dict[str, int]:
        parts = [self.store.memory_bytes()]
        for part in (self.window, self.sketch, self.tail, self.quest, self.prompt_ingest,
                     self.ann):
            if part is not None:
                parts.append(part.memory_bytes())
        total: dict[str, int] = {}
        for p in parts:
            for place, nbytes in p.items():
                total[place] = total.get(place, 0) + nbytes
        return total

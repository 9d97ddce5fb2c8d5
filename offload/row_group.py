"""RowGroup: one decode step's selection and host reads for a range of kv-head rows.

Each kv head's step is a chain: score the sketch (HBM-bound), take the candidates' top-k,
read their keys from the host (PCIe-bound), re-rank, read the chosen values (PCIe-bound).
Heads are independent all along it. So with the rows split in groups (kv.select_groups),
each group on its own CUDA stream, and each group's scoring starting when the previous
group's is done, one group's host reads run while the next group scores: the link and
the SMs work at the same time instead of taking turns. The result is the same as
selecting every row at once; a CUDA graph captures the streams' fork and join.

With one group (the default) the step runs on the caller's stream, as it always did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..index.retriever import LowRankRetriever
from .host_store import HostKVStore
from .lowrank import LowRankKeys
from .tail import TailEstimate

Merge = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (out, lse) -> out


@dataclass
class Pick:
    """What a group's rows attend besides the window, on the device."""

    positions: torch.Tensor  # [R', K] int64
    count: torch.Tensor  # [1] int32: leading entries of each row that are real
    k: torch.Tensor  # [R', K, D] their keys
    v: torch.Tensor  # [R', K, D] their values
    merge_tail: Merge | None  # adds the tail estimate to out [R', G, D], lse [R', G]


class RowGroup:
    """Rows [rows] of the step: their selector, sketch and tail (views of the whole ones
    when the group is a part), and, on a GPU, the stream they run on when there are
    several groups. `scored` is recorded on that stream once the group's candidates are
    chosen (its scoring pass is done): the next group's stream waits for it."""

    def __init__(self, rows: slice, selector, sketch: LowRankKeys | None,
                 tail: TailEstimate | None, store: HostKVStore, gather, gather_rows,
                 stream: torch.cuda.Stream | None = None) -> None:
        self.rows, self.selector, self.sketch, self.tail = rows, selector, sketch, tail
        self.store, self.stream = store, stream
        self._gather, self._gather_rows = gather, gather_rows
        self.scored = torch.cuda.Event() if stream is not None else None
        self._recorded = False
        self._side: torch.cuda.Stream | None = None  # the tail's partials run on it

    def exact_keys(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """The re-rank candidates' keys [R', C, D] (a part's LowRankRetriever reads them
        here, just after its candidates are chosen: hence the `scored` mark)."""
        self._mark_scored()
        return self._gather_rows(self.store.k[layer, self.rows], positions)

    def _mark_scored(self) -> None:
        if self.scored is not None and not self._recorded:
            self.scored.record()
            self._recorded = True

    def pick(self, layer: int, qg: torch.Tensor, lo: int, hi: torch.Tensor, budget: int,
             window_lse: torch.Tensor, pos: torch.Tensor) -> Pick:
        """Select and read this group's rows of qg [R, G, D] (window_lse [R, G] of the
        whole step) on the current stream."""
        self._recorded = False
        q, other = qg[self.rows], window_lse[self.rows]
        k_sel = None
        if hasattr(self.selector, "select_with_keys"):  # re-ranking may have read K
            sel, count, k_sel = self.selector.select_with_keys(layer, q, lo, hi, budget, other)
        else:
            sel, count = self.selector.select(layer, q, lo, hi, budget, other)  # [R', K], [1]
        self._mark_scored()  # no re-rank: selection is done
        merge = None
        if (self.tail is not None and self.selector.last_total is not None
                and self.selector.last_mass is not None):
            merge = self._start_tail(layer, sel, count, pos)
        k_src, v_src = self.store.k[layer, self.rows], self.store.v[layer, self.rows]
        if k_sel is None:
            k_sel, v_sel = self._gather(k_src, v_src, sel)
        else:  # values only: half the host reads
            v_sel = self._gather_rows(v_src, sel)
        return Pick(sel, count, k_sel, v_sel, merge)

    def _start_tail(self, layer: int, sel: torch.Tensor, count: torch.Tensor,
                    pos: torch.Tensor) -> Merge:
        """Begin the tail estimate of this step (offload/tail.py) -> merge(out, lse) of the
        exact part, out [R', G, D], lse [R', G]. The sketch's mass per chunk came from the
        selection's own scoring pass. On a GPU its partial sums run on a side stream,
        beside the value gather (host reads, which leave the SMs idle), and merge joins
        that stream first (the fork and join are captured by a CUDA graph too)."""
        selector = self.selector

        def start():
            scores = self.sketch.scores_at(layer, selector.last_query, sel)
            return self.tail.start(layer, selector.last_mass, selector.last_total, sel,
                                   scores, count, pos, self.store.k.shape[-1]**-0.5)

        if not sel.is_cuda:
            return start()
        here = torch.cuda.current_stream()
        if self._side is None:
            self._side = torch.cuda.Stream(sel.device)
        side = self._side
        side.wait_stream(here)
        with torch.cuda.stream(side):
            merge = start()

        def finish(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
            torch.cuda.current_stream().wait_stream(side)
            return merge(out, lse)

        return finish


def pick_all(groups: list[RowGroup], layer: int, qg: torch.Tensor, lo: int,
             hi: torch.Tensor, budget: int, window_lse: torch.Tensor,
             pos: torch.Tensor) -> list[Pick]:
    """Every group's Pick. With several groups on a GPU: each on its stream, forked from
    the current one, group i + 1 starting when group i has scored; all joined back."""
    args = (layer, qg, lo, hi, budget, window_lse, pos)
    if len(groups) == 1 or groups[0].stream is None:
        return [g.pick(*args) for g in groups]
    main = torch.cuda.current_stream()
    picks = []
    for i, g in enumerate(groups):
        g.stream.wait_stream(main)
        if i:
            g.stream.wait_event(groups[i - 1].scored)
        with torch.cuda.stream(g.stream):
            picks.append(g.pick(*args))
    for g in groups:
        main.wait_stream(g.stream)
    return picks


def split_rows(rows: int, groups: int) -> list[slice]:
    """rows split in `groups` contiguous ranges, as even as can be (the first ones larger)."""
    size, extra = divmod(rows, groups)
    bounds = [0]
    for i in range(groups):
        bounds.append(bounds[-1] + size + (i < extra))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def make_groups(count: int, rows: int, selector: LowRankRetriever, head_dim: int,
                sketch: LowRankKeys, tail: TailEstimate | None, store: HostKVStore, gather,
                gather_rows, device: torch.device) -> list[RowGroup]:
    """`count` groups of the rows, each with its own LowRankRetriever (the whole one's
    settings) over views of the sketch, tail and store."""
    groups = []
    for part in split_rows(rows, count):
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        g = RowGroup(part, None, sketch.rows(part), tail.rows(part) if tail else None,
                     store, gather, gather_rows, stream)
        g.selector = LowRankRetriever(g.sketch, head_dim, selector.rerank_factor,
                                      g.exact_keys, selector.block, selector.reuse_lse,
                                      selector.rerank_blocks)
        g.selector.tail_chunk = selector.tail_chunk
        groups.append(g)
    return groups

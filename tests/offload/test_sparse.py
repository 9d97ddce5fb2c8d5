"""SparseKV policies against exact dense attention on the same K, V."""

import dataclasses

import pytest
import torch

from retrieval_attn.config import IndexConfig, KVConfig
from retrieval_attn.errors import ConfigError
from retrieval_attn.offload.dense import DenseKV
from retrieval_attn.offload.make import make_kv_policy
from retrieval_attn.offload.policy import AttnStep
from retrieval_attn.offload.sparse import SparseKV

L, H, HKV, D, N = 2, 6, 2, 16, 96


def run_policy(kv, q, k, v, prompt, guess=None):
    """Prefill `prompt` tokens in one chunk, then decode the rest one by one. With guess,
    kv.lookahead(layer + 1, ...) before each decode layer, as the model calls it:
    guess(t, layer) -> q [1, H, 1, D]."""
    kv.start_request()
    outs = []
    for layer in range(L):  # layer-major prefill, as the runner does it
        outs.append(kv.attend(layer, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt],
                              AttnStep(torch.arange(prompt, device=q.device), 0)))
        kv.finish_layer(layer, prompt)
    kv.finish_prefill(prompt)
    for t in range(prompt, q.shape[2]):
        step = AttnStep(torch.tensor([t], device=q.device), t)
        for layer in range(L):
            if guess is not None and layer + 1 < L:
                kv.lookahead(layer + 1, lambda t=t, layer=layer + 1: guess(t, layer), step)
            outs.append(kv.attend(layer, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                  step))
    return outs


def qkv(T):
    return torch.randn(1, H, T, D), torch.randn(1, HKV, T, D), torch.randn(1, HKV, T, D)


@pytest.mark.parametrize("policy", ["streaming", "quest", "retrieval", "retrieval+attention",
                                    "retrieval+faiss-hnsw", "retrieval/int8", "retrieval/int4"])
def test_budget_covering_everything_is_exact(policy):
    # top_k >= every offloaded token: sparse attention must equal dense attention exactly
    policy, _, sketch = policy.partition("/")
    policy, _, kind = policy.partition("+")
    if kind:
        pytest.importorskip("faiss")
    index = IndexConfig(kind=kind or "lowrank", builder="inline", build_queries=16)
    cfg = KVConfig(policy=policy, sink_tokens=3, window_tokens=10, top_k=N, page_tokens=1,
                   rank=4, rerank_factor=2, sketch_dtype=sketch or "auto")
    q, k, v = qkv(70)
    dense = run_policy(DenseKV(L, 1, HKV, N, D, torch.device("cpu"), torch.float32),
                       q, k, v, 50)
    kv = make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32, index)
    sparse = run_policy(kv, q, k, v, 50)
    if kind:  # every decode step of every layer went through the host index
        assert kv.ann.served == {"index": L * 20, "lowrank": 0}
    for a, b in zip(sparse, dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sketch", ["auto", "int8"])
def test_blocks_covering_the_region_are_exact(sketch):
    """kv.select_block 4 with a budget of every whole block at the first decode step: the
    blocks and the partial block before the window attend every offloaded position, for
    as long as no new whole block appears (regions of 36 to 39 positions)."""
    cfg = KVConfig(policy="retrieval", sink_tokens=3, window_tokens=10, top_k=36, rank=4,
                   rerank_factor=2, select_block=4, sketch_dtype=sketch)
    q, k, v = qkv(52)
    dense = run_policy(DenseKV(L, 1, HKV, N, D, torch.device("cpu"), torch.float32),
                       q, k, v, 48)
    kv = make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    kv.trace = []
    sparse = run_policy(kv, q, k, v, 48)
    assert kv.selector.use_blocks
    assert [len(t.selected[0]) for t in kv.trace[::L]] == [36, 37, 38, 39]
    for a, b in zip(sparse, dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rerank", [1, 2])
def test_blocks_attend_window_and_chosen_positions_once(rerank):
    """A budget below the region: the output is exact attention over sinks, window and
    the traced selection, which is 8 positions (whole aligned runs without re-ranking)
    then the partial run, no repeats."""
    cfg = KVConfig(policy="retrieval", sink_tokens=3, window_tokens=10, top_k=8, rank=4,
                   rerank_factor=rerank, select_block=4, tail_estimate=False)
    q, k, v = qkv(66)
    kv = make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    kv.trace = []
    outs = run_policy(kv, q, k, v, 60)[L:]
    for entry, out in zip(kv.trace, outs, strict=True):
        n = entry.n
        hi = n - 10
        part = list(range(3 + (hi - 3) // 4 * 4, hi))
        for h in range(HKV):
            sel = entry.selected[h].tolist()
            assert len(set(sel)) == len(sel) == 8 + len(part) and sel[8:] == part
            if rerank == 1:
                assert all((p - 3) // 4 == (sel[i - i % 4] - 3) // 4
                           for i, p in enumerate(sel[:8]))
            keep = [0, 1, 2] + sel + list(range(hi, n))
            heads = slice(h * (H // HKV), (h + 1) * (H // HKV))
            ref = torch.nn.functional.scaled_dot_product_attention(
                entry.q[None, heads, None], k[0, h, keep][None, None], v[0, h, keep][None, None])
            torch.testing.assert_close(out[0, heads], ref[0], atol=1e-5, rtol=1e-5)


def test_streaming_attends_sinks_and_window_only():
    cfg = KVConfig(policy="streaming", sink_tokens=2, window_tokens=5, top_k=3)
    kv = SparseKV(cfg, 1, 2, 1, 4, 64, torch.device("cpu"), torch.float32)
    T = 40
    q, k, v = torch.randn(1, 2, T, 4), torch.randn(1, 1, T, 4), torch.randn(1, 1, T, 4)
    kv.start_request()
    kv.attend(0, q[:, :, :30], k[:, :, :30], v[:, :, :30], AttnStep(torch.arange(30), 0))
    kv.finish_layer(0, 30)
    kv.finish_prefill(30)
    out = kv.attend(0, q[:, :, 30:31], k[:, :, 30:31], v[:, :, 30:31],
                    AttnStep(torch.tensor([30]), 30))
    keep = [0, 1] + list(range(31 - 8, 31))  # sinks + window of 5 + 3 budget tokens
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, 30:31], k[:, :, keep], v[:, :, keep], enable_gqa=True)
    torch.testing.assert_close(out, ref)


def test_retrieval_finds_a_planted_key():
    # one key far outside the window is aligned with the query: retrieval must attend it
    cfg = KVConfig(policy="retrieval", sink_tokens=1, window_tokens=4, top_k=2, rank=4)
    kv = SparseKV(cfg, 1, 2, 1, 16, 64, torch.device("cpu"), torch.float32)
    q, k, v = torch.randn(1, 2, 41, 16), torch.randn(1, 1, 41, 16) * 0.1, torch.randn(1, 1, 41, 16)
    k[0, 0, 13] = q[0, 0, 40] * 3
    kv.start_request()
    kv.attend(0, q[:, :, :40], k[:, :, :40], v[:, :, :40], AttnStep(torch.arange(40), 0))
    kv.finish_layer(0, 40)
    kv.finish_prefill(40)
    kv.trace = []
    kv.attend(0, q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], AttnStep(torch.tensor([40]), 40))
    assert 13 in kv.trace[0].selected[0].tolist()


def test_memory_accounting_splits_gpu_state_from_host_store():
    cfg = KVConfig(policy="retrieval", sink_tokens=4, window_tokens=8, top_k=4, rank=4,
                   sketch_dtype="auto")
    kv = SparseKV(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    q, k, v = qkv(40)
    run_policy(kv, q, k, v, 40)
    store = 2 * L * HKV * N * D * 4
    window = 2 * L * HKV * (4 + 8) * D * 4
    sketch = (L * HKV * D + L * HKV * D * 4 + L * HKV * N * 4) * 4
    tail = L * HKV * 64 * D * 4  # V sums per 64-token chunk, float32, 64 chunks at least
    assert kv.memory_bytes() == {"host": store + window + sketch + tail}


def test_rank_above_head_dim_is_refused():
    from retrieval_attn.errors import ConfigError

    with pytest.raises(ConfigError, match="head_dim"):
        make_kv_policy(KVConfig(policy="retrieval", rank=32), 1, 2, 1, 16, 64,
                       torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("d", [64, 128])
def test_default_sketch_is_made_at_half_the_head_dim_in_int4(d):
    """kv.rank None reaches the policy as a number (make_kv_policy resolves it)."""
    kv = make_kv_policy(KVConfig(policy="retrieval"), 1, 2, 1, d, 64, torch.device("cpu"),
                        torch.float32)
    assert kv.cfg.rank == kv.sketch.rank == d // 2 and kv.sketch.sketch == "int4"
    assert kv.sketch.keys.shape[-1] == d // 4  # two dims per byte


def test_unsorted_selection_when_every_step_fills_top_k():
    """When the offloaded region already holds top_k tokens at the first decode step, the
    retriever skips sorting (its order is never read) and decode gives the same outputs
    as with sorted positions; a short prompt keeps them sorted (count < top_k)."""
    cfg = KVConfig(policy="retrieval", sink_tokens=3, window_tokens=10, top_k=8, rank=4,
                   rerank_factor=2, tail_estimate=False)
    q, k, v = qkv(66)

    def run(force_order):
        torch.manual_seed(0)
        kv = make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
        prepare = kv.selector.prepare

        def prepare_then_order(region, top):
            prepare(region, top)
            kv.selector.ordered = kv.selector.ordered or force_order
        kv.selector.prepare = prepare_then_order
        return kv, run_policy(kv, q, k, v, 60)

    kv, unsorted = run(False)
    assert kv.selector.ordered is False  # 60 + 1 - 10 - 3 >= 8
    _, ordered = run(True)
    for a, b in zip(unsorted, ordered, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    short = make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    run_policy(short, q[:, :, :18], k[:, :, :18], v[:, :, :18], 15)  # 15 + 1 - 13 < 8
    assert short.selector.ordered is True


@pytest.mark.parametrize("passes", [1, 2])
def test_score_passes_choose_the_retrievers_normalisation(passes):
    """kv.score_passes 2 scores with this step's exact lse (reuse_lse off), 1 with the
    previous step's; with a budget covering the region both are exact attention."""
    cfg = KVConfig(policy="retrieval", sink_tokens=3, window_tokens=10, top_k=N, rank=4,
                   rerank_factor=2, score_passes=passes)
    q, k, v = qkv(60)
    dense = run_policy(DenseKV(L, 1, HKV, N, D, torch.device("cpu"), torch.float32),
                       q, k, v, 50)
    kv = make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    assert kv.selector.reuse_lse == (passes == 1)
    for a, b in zip(run_policy(kv, q, k, v, 50), dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert bool(kv.selector.lse_state) == (passes == 1)  # one state per layer, or none


def test_int8_host_store_stays_close_to_dense():
    """kv.host_dtype int8 with a budget of every offloaded token: the only difference from
    dense attention is the stored rows' rounding (half a step of each row's absmax / 127)."""
    cfg = KVConfig(policy="retrieval", sink_tokens=3, window_tokens=10, top_k=N, rank=4,
                   rerank_factor=2, host_dtype="int8")
    q, k, v = qkv(70)
    dense = run_policy(DenseKV(L, 1, HKV, N, D, torch.device("cpu"), torch.float32),
                       q, k, v, 50)
    kv = make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    sparse = run_policy(kv, q, k, v, 50)
    assert kv.store.k.dtype == torch.int8
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(sparse[L:], dense[L:],
                                                               strict=True)]
    assert 1e-5 < max(errors) < 0.02  # rounded, and only a little


@pytest.mark.parametrize("field, bad, good, fix", [
    ("host_dtype", "fp8", "int8", "use kv.host_dtype auto, or index.kind lowrank"),
    ("store_on", "gpu", "device", "use kv.store_on host, or index.kind lowrank"),
])
def test_store_settings_are_checked_and_need_the_lowrank_index(field, bad, good, fix):
    with pytest.raises(ConfigError, match=f"kv.{field} is '{bad}'"):
        KVConfig(policy="retrieval", **{field: bad})
    cfg = KVConfig(policy="retrieval", rank=4, **{field: good})
    with pytest.raises(ConfigError, match=fix):
        make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32,
                       IndexConfig(kind="attention", builder="inline"))


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("rerank", [2, 1], ids=["rerank", "final"])
def test_lookahead_with_a_budget_of_everything_is_exact(block, rerank):
    """Candidates chosen with a poor guess (noise) are re-ranked with the real queries (or
    without a re-rank, final); a budget of every offloaded token keeps them all, so the
    output is dense attention."""
    cfg = KVConfig(policy="retrieval", sink_tokens=3, window_tokens=10, top_k=N, rank=4,
                   rerank_factor=rerank, select_block=block, tail_estimate=False,
                   lookahead_from=1)
    q, k, v = qkv(70)
    dense = run_policy(DenseKV(L, 1, HKV, N, D, torch.device("cpu"), torch.float32),
                       q, k, v, 50)
    kv = make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    used = taken_choices(kv)
    sparse = run_policy(kv, q, k, v, 50, lambda t, layer: torch.randn(1, H, 1, D))
    assert len(used) == 20  # L = 2: layer 1 of each of the 20 decode steps looked ahead
    for a, b in zip(sparse, dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def taken_choices(kv):
    """The choices attend takes from kv's lookahead (AheadChoice each), as it takes them."""
    taken, take = [], kv.ahead.take

    def record(layer, step):
        choice = take(layer, step)
        if choice is not None:
            taken.append(choice)
        return choice
    kv.ahead.take = record
    return taken


def test_lookahead_scores_with_its_share_of_the_sms():
    """kv.lookahead_sm_share reaches the looked-ahead layers' candidate choice (the
    GPU's scoring pass sizes its grid by it; the CPU reference has none), and no other."""
    cfg = KVConfig(policy="retrieval", sink_tokens=3, window_tokens=10, top_k=12, rank=4,
                   rerank_factor=2, lookahead_from=1, lookahead_sm_share=0.5)
    q, k, v = qkv(40)
    kv = make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    shares = []
    real = kv.selector.candidates

    def candidates(layer, q, lo, hi, k, other_lse=None, sm_share=1.0):
        shares.append((layer, sm_share))
        return real(layer, q, lo, hi, k, other_lse, sm_share)
    kv.selector.candidates = candidates
    run_policy(kv, q, k, v, 30, lambda t, layer: q[:, :, t:t + 1])
    assert set(shares) == {(0, 1.0), (1, 0.5)}  # layer 0 chooses at attend: every SM


def test_lookahead_with_the_real_query_selects_as_without():
    """Guessing the real query: the same output as selecting at attend, but where the
    window's lse, taken before the step's token enters, moves the group shares enough to
    swap candidates (a few steps of these random heads; layer 0 never looks ahead). The
    tail estimate is off: a looked-ahead layer weighs its tail by the guess's sketch
    scores of the selected tokens, not their exact ones."""
    cfg = dict(policy="retrieval", sink_tokens=3, window_tokens=10, top_k=12, rank=8,
               rerank_factor=2, select_block=4, sketch_dtype="int8", tail_estimate=False)
    torch.manual_seed(0)
    q, k, v = qkv(80)
    outs = {}
    for ahead in (0, 1):
        kv = make_kv_policy(KVConfig(**cfg, lookahead_from=ahead), L, H, HKV, D, N,
                            torch.device("cpu"), torch.float32)
        outs[ahead] = run_policy(kv, q, k, v, 60, lambda t, layer: q[:, :, t:t + 1])[L:]
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(outs[1], outs[0], strict=True)]
    assert max(errors[0::L]) == 0  # layer 0
    assert sum(e < 1e-5 for e in errors[1::L]) >= 0.6 * len(errors[1::L]) and max(errors) > 0


def test_lookahead_needs_the_lowrank_index():
    with pytest.raises(ConfigError, match="kv.lookahead_from is -1"):
        KVConfig(policy="retrieval", lookahead_from=-1)
    cfg = KVConfig(policy="retrieval", lookahead_from=2, rerank_factor=2, rank=4)
    with pytest.raises(ConfigError, match="use kv.lookahead_from 0, or index.kind lowrank"):
        make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32,
                       IndexConfig(kind="attention", builder="inline"))


def _final_lookahead(device, side_reads=True):
    """Decode with lookahead and no re-rank (the guess's choice final), tail on, an int8
    store and a noisy guess; side_reads False makes attend read the choice and start its
    tail itself (as without lookahead) instead of taking what the side stream made."""
    h, hkv, d, n, prompt = 8, 2, 64, 3000, 2900
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=gen).to(device) for heads in (h, hkv, hkv))
    cfg = KVConfig(policy="retrieval", sink_tokens=4, window_tokens=64, top_k=128, rank=16,
                   sketch_dtype="int8", rerank_factor=1, select_block=4, lookahead_from=1,
                   host_dtype="int8")
    kv = make_kv_policy(cfg, L, h, hkv, d, n, torch.device(device), torch.float32)
    attend, ready = kv.attend, []

    def attend_here(layer, *a):
        ahead = kv.ahead.pending.get(layer)
        if ahead is not None:
            ready.append(ahead.ready is not None and ahead.ready.merge is not None)  # tail
            if not side_reads:
                kv.ahead.pending[layer] = dataclasses.replace(ahead, ready=None)
        return attend(layer, *a)
    kv.attend = attend_here
    outs = run_policy(kv, q, k, v, prompt,
                      lambda t, layer: q[:, :, t:t + 1] + 0.3 * q[:, :, t - 1:t])
    assert ready == [True] * (n - prompt)  # layer 1 of every step: chosen and read ahead
    return outs


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_final_lookahead_reads_its_choice_and_tail_as_attend_would(device):
    """Without a re-rank, lookahead reads the chosen K, V and starts the tail estimate on
    its side stream; attend then only attends and merges. Same output as attend reading
    the same choice and computing the tail itself (on a GPU: the same kernels, on other
    streams)."""
    ahead, here = _final_lookahead(device), _final_lookahead(device, side_reads=False)
    for a, b in zip(ahead, here, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_lookahead_left_by_another_step_is_dropped():
    cfg = KVConfig(policy="retrieval", sink_tokens=3, window_tokens=10, top_k=12, rank=4,
                   rerank_factor=2, lookahead_from=1)
    q, k, v = qkv(60)
    kv = make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    run_policy(kv, q, k, v, 59)
    kv.lookahead(1, lambda: torch.randn(1, H, 1, D), AttnStep(torch.tensor([59]), 59))
    assert 1 in kv.ahead.pending  # an interrupted step: its layer 1 never attended
    step = AttnStep(torch.tensor([59]), 59)
    used = taken_choices(kv)  # none: the choice of another step is not used
    kv.attend(1, q[:, :, 59:60], k[:, :, 59:60], v[:, :, 59:60], step)
    assert kv.ahead.pending == {} and used == []


def test_a_device_store_gathers_the_chosen_keys_with_their_values():
    """kv.store_on device: the re-rank leaves the chosen tokens' keys (chosen_keys False)
    and attend gathers their K with their V from the store, one launch on a GPU instead of
    two; a host store takes the keys from the candidates' and reads only V over PCIe. The
    rows are the same: every output equal."""
    h, hkv, d, n, prompt = 8, 2, 64, 2940, 2900
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=gen) for heads in (h, hkv, hkv))
    outs, pairs = {}, {}
    for place in ("host", "device"):
        cfg = KVConfig(policy="retrieval", sink_tokens=4, window_tokens=64, top_k=64, rank=16,
                       sketch_dtype="int8", rerank_factor=2, select_block=4,
                       host_dtype="int8", store_on=place)
        kv = make_kv_policy(cfg, L, h, hkv, d, n, torch.device("cpu"), torch.float32)
        assert kv.selector.chosen_keys == (place == "host")
        calls, gather = [], kv.store.gather
        kv.store.gather = lambda *a, calls=calls, gather=gather: (calls.append(1)
                                                                  or gather(*a))
        outs[place] = run_policy(kv, q, k, v, prompt)
        pairs[place] = len(calls)
    assert pairs == {"host": 0, "device": (n - prompt) * L}
    for a, b in zip(outs["device"], outs["host"], strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("ahead, rerank", [(0, 2), (1, 2), (1, 1)],
                         ids=["select", "lookahead", "final"])
def test_store_on_device_decodes_as_the_host_store_on_gpu(ahead, rerank):
    """kv.store_on device reads the same int8 rows from HBM that the host store reads over
    PCIe (the attention kernel reads them by index; the host store's are gathered): every
    output equal, the store counted on the GPU."""
    h, hkv, d, n, prompt = 8, 2, 64, 3000, 2900
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=gen).cuda() for heads in (h, hkv, hkv))
    outs, mem = {}, {}
    for place in ("host", "device"):
        cfg = KVConfig(policy="retrieval", sink_tokens=4, window_tokens=64, top_k=64, rank=16,
                       sketch_dtype="int8", rerank_factor=rerank, select_block=4,
                       lookahead_from=ahead, host_dtype="int8", store_on=place)
        kv = make_kv_policy(cfg, L, h, hkv, d, n, torch.device("cuda"), torch.float32)
        assert kv.indexed_reads == (place == "device")
        guess = (lambda t, layer: q[:, :, t:t + 1] + 0.1 * q[:, :, t - 1:t]) if ahead else None
        outs[place] = run_policy(kv, q, k, v, prompt, guess)
        mem[place] = kv.memory_bytes()
        assert kv.store.k.is_cuda == (place == "device")
    store = 2 * L * hkv * n * d  # int8 K, V
    assert mem["device"]["gpu"] == mem["host"]["gpu"] + store
    assert mem["host"]["host"] == store and "host" not in mem["device"]
    for a, b in zip(outs["device"], outs["host"], strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("ahead", [0, 1], ids=["select", "lookahead"])
def test_tail_chunk_term_summed_in_the_scoring_pass_decodes_as_apart(ahead):
    """On a GPU, with a window of >= CHUNK tokens, the scoring pass sums the tail's chunk
    term itself (selector.tail_sums); the outputs match the tail's own chunk sums from
    the pass's masses (tail_sums unset), up to float32 summation order."""
    h, hkv, d, n, prompt = 8, 2, 64, 3000, 2900
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=gen).cuda() for heads in (h, hkv, hkv))
    outs = {}
    for fused in (True, False):
        cfg = KVConfig(policy="retrieval", sink_tokens=4, window_tokens=64, top_k=64, rank=16,
                       sketch_dtype="int8", rerank_factor=2, select_block=4,
                       lookahead_from=ahead, host_dtype="int8")
        kv = make_kv_policy(cfg, L, h, hkv, d, n, torch.device("cuda"), torch.float32)
        assert kv.selector.tail_sums is not None
        if not fused:
            kv.selector.tail_sums = None
        guess = (lambda t, layer: q[:, :, t:t + 1] + 0.1 * q[:, :, t - 1:t]) if ahead else None
        outs[fused] = run_policy(kv, q, k, v, prompt, guess)
    for a, b in zip(outs[True], outs[False], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

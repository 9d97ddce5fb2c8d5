"""append_token against append_token_ref: every write of a decode token, fused."""

import pytest
import torch

from retrieval_attn.kernels.append_token import append_token, append_token_ref
from retrieval_attn.kernels.formats import SketchLayer, TailLayer, sketch_rows, unpack_int4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
R, N, D, S, W, CHUNK = 3, 300, 32, 4, 16, 64


def _state(dtype, sketch_dtype, rank, tail, device, pinned=False, sums_dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    store = [torch.randn(R, N, D, generator=g).to(dtype) for _ in range(2)]
    if pinned or device == "cuda":  # a host store is written from the GPU only when pinned
        store = [t.pin_memory() for t in store]
    window = [torch.randn(R, S + W, D, generator=g).to(dtype).to(device) for _ in range(2)]
    sums = TailLayer(torch.randn(R, -(-N // CHUNK), D, generator=g).to(device, sums_dtype),
                     torch.full((R,), -1, dtype=torch.long, device=device), CHUNK)
    sketch = None
    if sketch_dtype is not None:
        width = rank // 2 if sketch_dtype == torch.uint8 else rank
        keys = torch.zeros(R, N, width, dtype=sketch_dtype)
        sketch = SketchLayer(torch.randn(R, D, generator=g).to(device),
                             torch.randn(R, D, rank, generator=g).to(device) / D**0.5,
                             (torch.rand(R, rank, generator=g) + 0.05).to(device) / 20,
                             keys.to(device))
    return store, window, (sums if tail else None), sketch


def _cpu_copy(state):
    """The state's copy on the CPU, for the reference to write."""
    store, window, tail, sketch = state
    c = lambda t: t.cpu().clone()  # noqa: E731
    return ([c(t) for t in store], [c(t) for t in window],
            tail and TailLayer(c(tail.sums), c(tail.last), tail.chunk),
            sketch and SketchLayer(*(c(t) for t in sketch)))


def _assert_same(got, want, sketch_dtype, written):
    for a, b in zip(got[0] + got[1], want[0] + want[1], strict=True):
        assert torch.equal(a.cpu(), b.cpu())
    if got[2] is not None:
        a, b = got[2].sums.cpu(), want[2].sums.cpu()
        if a.dtype == torch.bfloat16:  # one rounding a token: the interpreter truncates
            # where a GPU rounds to nearest: up to an ulp a token apart (v's are ~1 here)
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-6, atol=2**-4)
        else:
            torch.testing.assert_close(a, b)
        assert torch.equal(got[2].last.cpu(), want[2].last.cpu())
    if got[3] is not None:
        a, b = got[3].keys.cpu(), want[3].keys.cpu()
        assert torch.equal(a[:, ~written], b[:, ~written])
        a, b = a[:, written], b[:, written]
        if sketch_dtype == torch.uint8:
            a, b = unpack_int4(a), unpack_int4(b)
        if sketch_dtype.is_floating_point:
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
        else:  # the kernel sums the projection in its own order: a boundary may round apart
            diff = (a.int() - b.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def _written(positions) -> torch.Tensor:
    mask = torch.zeros(N, dtype=torch.bool)
    mask[list(positions)] = True
    return mask


@pytest.mark.parametrize("dtype, sketch_dtype, rank, tail, sums_dtype", [
    pytest.param(torch.float32, torch.int8, 16, True, torch.float32, id="f32-int8-tail"),
    pytest.param(torch.bfloat16, torch.uint8, 32, True, torch.float32, id="bf16-int4-tail"),
    pytest.param(torch.bfloat16, torch.int8, 16, True, torch.bfloat16,
                 id="bf16-bf16-tail-sums"),
    pytest.param(torch.float32, torch.float32, 8, False, torch.float32, id="f32-float-sketch"),
    pytest.param(torch.bfloat16, None, 0, False, torch.float32,
                 id="bf16-window-and-store-only"),
])
def test_matches_reference_over_sinks_ring_and_repeats(dtype, sketch_dtype, rank, tail,
                                                       sums_dtype):
    state = _state(dtype, sketch_dtype, rank, tail, DEVICE, sums_dtype=sums_dtype)
    want = _cpu_copy(state)
    g = torch.Generator().manual_seed(1)
    # a sink position, ring slots before and after wrapping, a repeat (graph warm-up), and
    # positions in later tail chunks
    positions = (2, 20, 21, 21, 37, 130, 130, 299)
    for p in positions:
        k, v = (torch.randn(R, D, generator=g).to(dtype) for _ in range(2))
        pos = torch.tensor([p])
        append_token(pos.to(DEVICE), k.to(DEVICE), v.to(DEVICE), state[0], state[1], S,
                     state[2], state[3])
        append_token_ref(pos, k, v, want[0], want[1], S, want[2], want[3])
    _assert_same(state, want, sketch_dtype, _written(positions))


def test_reference_counts_a_repeated_position_once_and_saturates():
    state = _state(torch.float32, torch.int8, 16, True, "cpu")
    store, window, tail, sketch = state
    before = tail.sums.clone()
    v = torch.randn(R, D)
    for _ in range(3):
        append_token_ref(torch.tensor([70]), torch.randn(R, D), v, store, window, S, tail,
                         sketch)
    torch.testing.assert_close(tail.sums[:, 1], before[:, 1] + v)
    huge = torch.full((R, D), 1e4)
    assert sketch_rows(huge, sketch).abs().max() == 127
    assert window[0].shape[1] == S + W and torch.equal(window[1][:, S + (70 - S) % W], v)


def test_rejects_a_tail_of_the_wrong_rows():
    store, window, tail, sketch = _state(torch.float32, torch.int8, 16, True, "cpu")
    bad = TailLayer(tail.sums[:2], tail.last[:2], CHUNK)
    with pytest.raises(ValueError, match="tail must be"):
        append_token(torch.tensor([5]), torch.randn(R, D), torch.randn(R, D), store, window,
                     S, bad, sketch)


@pytest.mark.gpu
def test_real_shape_into_pinned_host_memory_from_a_cuda_graph():
    global R, N, D, S, W  # noqa: PLW0603 (the module's small shape, grown for this test)
    saved = R, N, D, S, W
    R, N, D, S, W = 4, 1 << 16, 128, 4, 512
    try:
        state = _state(torch.bfloat16, torch.int8, 64, True, "cuda", pinned=True)
        pos = torch.zeros(1, dtype=torch.long, device="cuda")
        k = torch.randn(R, D, device="cuda").bfloat16()
        v = torch.randn(R, D, device="cuda").bfloat16()
        append_token(pos, k, v, *state[:2], S, *state[2:])  # compile outside the capture
        torch.cuda.synchronize()
        want = _cpu_copy(state)  # position 0 is in: its replay below must add nothing
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            append_token(pos, k, v, *state[:2], S, *state[2:])
        positions = (0, 3, 700, 700, N - 1)
        for p in positions:
            pos.fill_(p)
            k.normal_()
            v.normal_()
            graph.replay()
            append_token_ref(pos.cpu(), k.cpu(), v.cpu(), want[0], want[1], S, *want[2:])
        torch.cuda.synchronize()
        _assert_same(state, want, torch.int8, _written(positions))
    finally:
        R, N, D, S, W = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantised_store_rows_match_reference_and_read_back(dtype):
    """An int8 store: each row's integers and float16 scale, as quantize_rows makes them,
    and read back within half a step of the token."""
    from retrieval_attn.kernels.formats import dequantize_rows, quantize_rows

    _, window, tail, sketch = _state(dtype, torch.int8, 16, True, DEVICE)
    store = [torch.zeros(R, N, D, dtype=torch.int8, device=DEVICE) for _ in range(2)]
    scales = [torch.zeros(R, N, dtype=torch.float16, device=DEVICE) for _ in range(2)]
    want = _cpu_copy((store, window, tail, sketch))
    want_scales = [t.cpu().clone() for t in scales]
    g = torch.Generator().manual_seed(2)
    for p in (1, 40, 40, 299):
        k, v = ((torch.randn(R, D, generator=g) * 3).to(dtype) for _ in range(2))
        k[0] = 0  # a row of zeros stores zeros
        pos = torch.tensor([p])
        append_token(pos.to(DEVICE), k.to(DEVICE), v.to(DEVICE), store, window, S, tail,
                     sketch, store_scale=tuple(scales))
        append_token_ref(pos, k, v, want[0], want[1], S, want[2], want[3],
                         store_scale=tuple(want_scales))
        for rows, sc, x in zip(store, scales, (k, v), strict=True):
            back = dequantize_rows(rows[:, p].cpu(), sc[:, p].cpu(), torch.float32)
            step = sc[:, p].cpu().float()[:, None]
            assert (back - x.float()).abs().le(step / 2 + 1e-6).all()
            assert torch.equal(rows[:, p].cpu(), quantize_rows(x)[0])
    for a, b in zip(store + scales, want[0] + want_scales, strict=True):
        assert torch.equal(a.cpu(), b)
    assert store[0][0, 1].abs().max() == 0 and store[1].abs().max() == 127


def test_rejects_a_quantised_store_without_int8_rows():
    store, window, tail, sketch = _state(torch.float32, None, 0, False, "cpu")
    scales = tuple(torch.zeros(R, N, dtype=torch.float16) for _ in range(2))
    with pytest.raises(ValueError, match="store K must be .* torch.int8"):
        append_token(torch.tensor([5]), torch.randn(R, D), torch.randn(R, D), store, window,
                     S, store_scale=scales)

"""Storage formats and state types that the kernels, their references and offload/ share.

A quantised sketch's keys: int8 [R, N, r] hold integers in [-127, 127]; uint8 [R, N, r / 2]
hold two signed 4-bit integers in [-7, 7] per byte, dim j in the low nibble and dim
j + r / 2 in the high one (so a kernel unpacks two contiguous halves, no shuffle), each
stored plus 8. Either way the per-dim scales are folded into the basis by the caller, so
scores need only the integers; the query is scored as int8 with one step per kv head.
An int8 K, V store keeps each row's integers and a float16 scale (quantize_rows).
"""

from typing import NamedTuple

import torch

INT4_OFFSET = 8


INT_MAX = {torch.int8: 127, torch.uint8: 7}  # largest integer: int8, packed int4


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int tensor [..., r] (r even) in [-7, 7] -> uint8 [..., r / 2]."""
    if values.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dim; got {values.shape[-1]}")
    v = (values.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    half = v.shape[-1] // 2
    return v[..., :half] | (v[..., half:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., r / 2] -> int8 [..., r] in [-8, 7] (pack_int4's inverse)."""
    low = (packed & 15).to(torch.int8) - INT4_OFFSET
    high = (packed >> 4).to(torch.int8) - INT4_OFFSET
    return torch.cat([low, high], dim=-1)


def sketch_values(keys: torch.Tensor) -> torch.Tensor:
    """A sketch's keys as float32 [Hkv, N, r], whatever their storage (see above)."""
    if keys.dtype == torch.uint8:
        return unpack_int4(keys).float()
    return keys.float()


def quantize_query(qr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q @ basis [Hkv, G, r] float32 -> (int8 values [Hkv, G, r], step [Hkv] float32): what
    an integer sketch is scored against (absmax per kv head, no host sync). Its rounding,
    1/254 of the head's largest value, is no coarser than an int8 key's."""
    step = qr.abs().amax(dim=(1, 2)).clamp_min(1e-30) / 127
    return (qr / step[:, None, None]).round().clamp(-127, 127).to(torch.int8), step


class SketchLayer(NamedTuple):
    """One layer of a low-rank key sketch: mean [R, D], basis [R, D, r], per-dim integer
    step scale [R, r] float32 (unread for a float sketch), keys [R, N, w]: int8 (w = r),
    packed int4 uint8 (w = r / 2) or a float dtype (w = r)."""

    mean: torch.Tensor
    basis: torch.Tensor
    scale: torch.Tensor
    keys: torch.Tensor


def sketch_storage(projected: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """float32 projections [R, n, r] -> a sketch's stored form in `dtype`: integers
    projected / scale ([R, r] steps) rounded and saturated for int8 / packed int4 uint8,
    a plain cast for a float dtype."""
    if dtype.is_floating_point:
        return projected.to(dtype)
    top = INT_MAX[dtype]
    ints = (projected / scale[:, None]).round_().clamp_(-top, top).to(torch.int8)
    return ints if dtype == torch.int8 else pack_int4(ints)


def sketch_rows(k: torch.Tensor, sketch: SketchLayer) -> torch.Tensor:
    """k [R, D] -> the sketch's stored form [R, w] of (k - mean) @ basis, in float32."""
    projected = (k.float() - sketch.mean.float())[:, None] @ sketch.basis.float()
    return sketch_storage(projected, sketch.scale, sketch.keys.dtype)[:, 0]


class SketchQuery(NamedTuple):
    """qr [Hkv, G, r]: q @ basis, int8 for an integer sketch (times step), else float32;
    step [Hkv] float32 (ones for a float sketch); const [Hkv, G] float32: q·mean."""

    qr: torch.Tensor
    step: torch.Tensor
    const: torch.Tensor

    def values(self) -> torch.Tensor:
        """q @ basis [Hkv, G, r] float32, as scored (the int8 rounding included)."""
        return self.qr.float() * self.step[:, None, None]


class LseState(NamedTuple):
    """What a one-pass select_scores normalises by, one per layer: lse [2, Hkv, G] float32,
    the region's log-sum-exp at the step before the latest and at the latest, and hi [Hkv]
    int64, the latest step's hi (-1: none), kept per kv head so that the kernel's program
    of each head updates its own. A step of a new hi reads lse[1]; a repeat of
    the latest step (a CUDA graph's warm-up and capture run a step more than once) reads
    lse[0], so repeats select what the first run did."""

    lse: torch.Tensor
    hi: torch.Tensor

    @classmethod
    def empty(cls, hkv: int, g: int, device: torch.device | str) -> "LseState":
        return cls(torch.full((2, hkv, g), float("-inf"), device=device),
                   torch.full((hkv,), -1, dtype=torch.long, device=device))


def quantize_rows(x: torch.Tensor, scale_dtype: torch.dtype = torch.float16
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (ints [..., D] int8, scale [...] scale_dtype): each row's absmax
    maps to 127 (the scale rounded to scale_dtype first, so that ints * scale is what is
    read back; no smaller than scale_dtype's smallest normal number), rounded half to even.
    float16 scales for the K, V store's rows; float32 for weights (kernels.quantize_guess)."""
    top = x.float().abs().amax(dim=-1)
    scale = (top / 127).clamp_min(torch.finfo(scale_dtype).tiny).to(scale_dtype)
    ints = (x.float() / scale.float()[..., None]).round_().clamp_(-127, 127)
    return ints.to(torch.int8), scale


def dequantize_rows(ints: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
                    ) -> torch.Tensor:
    """ints [..., D] int8, scale [...] -> float32(ints) * float32(scale) in dtype."""
    return (ints.float() * scale.float()[..., None]).to(dtype)


# the smallest float16 row scale: a row of zeros stores zeros (a normal float16, 2**-14)
SCALE_MIN = torch.finfo(torch.float16).tiny


def window_slot(pos: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Slot of position pos in a window of `sinks` sinks and a ring of `window` recent
    tokens (offload/window.py)."""
    return torch.where(pos < sinks, pos, sinks + (pos - sinks) % window)


class TailLayer(NamedTuple):
    """One layer of a tail estimate: sums [R, M, D] float32 of V per chunk of `chunk`
    positions, last [R] int64 the position last added to each row (-1: none): a graph's
    warm-up and replay append the same token twice, and a sum must count it once."""

    sums: torch.Tensor
    last: torch.Tensor
    chunk: int


class ChunkTail(NamedTuple):
    """Partial sums of the tail's chunk term, sum_c mass_gc / filled_c · sums_c, and of
    its mass: part_t [R, S, G_PAD, D] and part_m [R, S, G_PAD] float32 (G_PAD >= G, S
    partials). tail_partials makes them, or select_scores in its pass (tail_sums)."""

    part_t: torch.Tensor
    part_m: torch.Tensor

"""Reference sketch_query: a decode query as select_scores scores a low-rank sketch.

Score of sketched position n for query head (h, g): q·mean + (q @ basis)·keys[n]. Integer
sketches are scored against q @ basis rounded to int8 with one step per kv head
(kernels/formats.py, quantize_query), float sketches against q @ basis in float32.
"""

import torch

from retrieval_attn.kernels.formats import SketchQuery, quantize_query, sketch_values


def sketch_query_ref(q: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor | None,
                     mean: torch.Tensor, integer: bool) -> SketchQuery:
    """q [Hkv, G, D], basis [Hkv, D, r], scale [Hkv, r] (the integer keys' per-dim steps,
    folded into the basis; None: ones), mean [Hkv, D] -> SketchQuery."""
    b = basis.float() if scale is None else basis.float() * scale.float()[:, None, :]
    qr = q.float() @ b
    const = (q.float() @ mean.float()[..., None])[..., 0]
    if integer:
        ints, step = quantize_query(qr)
        return SketchQuery(ints, step, const)
    return SketchQuery(qr, torch.ones(q.shape[0], device=q.device), const)


def sketch_scores_at_ref(query: SketchQuery, keys: torch.Tensor,
                         positions: torch.Tensor) -> torch.Tensor:
    """Sketched q·k of given positions, float32, as select_scores scores them.
    keys [Hkv, N, w] one layer of a sketch (kernels/formats.py), positions
    [Hkv, K] -> [Hkv, G, K]."""
    at = keys.gather(1, positions[..., None].expand(-1, -1, keys.shape[-1]))
    return torch.baddbmm(query.const[..., None], query.values(),
                         sketch_values(at).transpose(1, 2))

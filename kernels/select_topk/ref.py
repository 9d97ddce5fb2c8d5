"""Reference select_topk: the k largest of each row, as positions in increasing order."""

import torch


def select_topk_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [R, C] float -> [R, k] int64 column indices of each row's k largest values, in
    increasing order; of equal values at the cut, the lower indices are kept."""
    # a stable descending sort keeps equal values in index order
    order = torch.sort(x.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values

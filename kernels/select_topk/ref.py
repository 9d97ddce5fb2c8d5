"""Reference select_topk: the k largest of each row, as positions in increasing order."""

import torch


def select_topk_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [R, C] float -> [R, k] int64 column indices of each row's k largest values, in
    increasing order; of equal values at the cut, the lower indices are kept."""
    # a stable descending sort keeps equal values in index order
    order = torch.sort(x.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values


def select_topk_values_ref(x: torch.Tensor, k: int, values: torch.Tensor, always: int = 0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """select_topk_ref's columns, then the always columns C .. C + always - 1 after them
    -> (columns [R, k + always], values [R, C + always] at those columns)."""
    c = x.shape[1]
    extra = torch.arange(c, c + always, device=x.device).expand(x.shape[0], always)
    cols = torch.cat([select_topk_ref(x, k), extra], dim=1)
    return cols, values.gather(1, cols)

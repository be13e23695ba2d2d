"""Small helpers shared by the test modules."""

import torch


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in float64 on the CPU (a and b may live on any device, in any float dtype)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max())

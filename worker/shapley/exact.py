"""Exact Shapley values by enumerating all 2^n coalitions.

The reference the estimator is tested against, usable up to about 16 players.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["exact_shapley", "all_coalitions"]


def all_coalitions(n: int) -> torch.Tensor:
    """``[2^n, n]`` bool; row ``s`` keeps player ``i`` when bit ``i`` of ``s`` is set."""
    codes = torch.arange(1 << n).unsqueeze(1)
    return (codes >> torch.arange(n)) & 1 == 1


def exact_shapley(value: Callable[[torch.Tensor], torch.Tensor], n: int, chunk: int = 256) -> torch.Tensor:
    """φ_i = Σ_S |S|!(n−|S|−1)!/n! · (V(S ∪ {i}) − V(S)) over all S not holding i.

    ``value`` maps coalitions ``[M, n]`` (bool) to values ``[M]``.
    """
    if n > 20:
        raise ValueError(f"exact Shapley values need 2^{n} evaluations; use the estimator instead")
    coalitions = all_coalitions(n)
    v = torch.cat([value(coalitions[s : s + chunk]).to(torch.float64) for s in range(0, len(coalitions), chunk)])
    size = coalitions.sum(1)
    weight = torch.tensor(
        [math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)], dtype=torch.float64
    )
    phi = torch.empty(n, dtype=torch.float64)
    codes = torch.arange(1 << n)
    for i in range(n):
        without = codes[(codes >> i) & 1 == 0]
        phi[i] = (weight[size[without]] * (v[without | (1 << i)] - v[without])).sum()
    return phi

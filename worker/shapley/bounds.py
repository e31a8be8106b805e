"""Confidence half-widths for each player's mean marginal contribution.

All three bounds split the error level over the players (δ' = δ / n), so the
intervals hold *together* at level 1 − δ, the union bound the original
Neuron Shapley code lacked.

* ``bernstein``: empirical Bernstein (Maurer & Pontil 2009) with the range of
  a marginal known in advance (twice the metric's range). Rigorous, but with
  accuracy its ``7R ln(2/δ')/(3(n−1))`` term dominates for thousands of
  samples, so the bandit eliminates almost nobody.
* ``bernstein_observed``: the same with the range observed in the player's
  marginals so far. Not rigorous (the range is estimated), much tighter.
* ``normal``: the normal approximation ``z·s/√n``. Not rigorous for few
  samples, tight, and what our benchmark picked as the default.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from .stats import PlayerStats

__all__ = ["BOUNDS", "half_widths"]

BOUNDS = ("normal", "bernstein", "bernstein_observed")


def half_widths(stats: PlayerStats, bound: str, delta: float, value_range: float | None) -> torch.Tensor:
    """Half-width of every player's interval; players with fewer than two samples get the full range."""
    n_players = stats.count.numel()
    delta_each = delta / n_players
    log_term = math.log(2.0 / delta_each)
    n = stats.count.to(torch.float64)
    if value_range is not None:
        full = torch.full_like(n, 2.0 * value_range)
    else:  # unbounded metric: the widest spread of marginals seen in any player
        seen = stats.count > 0
        spread = (stats.high[seen].max() - stats.low[seen].min()).item() if bool(seen.any()) else float("inf")
        full = torch.full_like(n, spread)
    s2 = stats.variance
    if bound == "normal":
        z = NormalDist().inv_cdf(1.0 - delta_each / 2.0)
        width = z * torch.sqrt(s2 / n.clamp_min(1))
    elif bound in ("bernstein", "bernstein_observed"):
        r = full if bound == "bernstein" else (stats.high - stats.low).clamp_min(0.0)
        width = torch.sqrt(2.0 * s2 * log_term / n.clamp_min(1)) + 7.0 * r * log_term / (3.0 * (n - 1).clamp_min(1))
    else:
        raise ValueError(f"unknown bound {bound!r}")
    return torch.where(n <= 1, full, torch.minimum(width, full))

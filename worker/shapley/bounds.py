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

Whatever the bound, a player with fewer than ``min_informative`` informative
samples (:mod:`.stats`) and some uninformative ones gets at least the rigorous
``bernstein`` width: its samples may all be the zeros of walks truncated
before reaching it, whose sample variance of 0 would give the other two a
zero-width interval, which a rare but large marginal would lie outside of.
Such a player is undecided anyway; this keeps the interval it is *reported*
with honest. (Without truncation every sample is informative.)
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from .stats import PlayerStats

__all__ = ["BOUNDS", "half_widths"]

BOUNDS = ("normal", "bernstein", "bernstein_observed")


def half_widths(
    stats: PlayerStats, bound: str, delta: float, value_range: float | None, min_informative: int = 0
) -> torch.Tensor:
    """Half-width of every player's interval; players with fewer than two samples get the full range, those
    with fewer than ``min_informative`` informative samples and some truncation zeros at least the known-range
    Bernstein width."""
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

    def bernstein(r: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(2.0 * s2 * log_term / n.clamp_min(1)) + 7.0 * r * log_term / (3.0 * (n - 1).clamp_min(1))

    if bound == "normal":
        z = NormalDist().inv_cdf(1.0 - delta_each / 2.0)
        width = z * torch.sqrt(s2 / n.clamp_min(1))
    elif bound == "bernstein":
        width = bernstein(full)
    elif bound == "bernstein_observed":
        width = bernstein((stats.high - stats.low).clamp_min(0.0))
    else:
        raise ValueError(f"unknown bound {bound!r}")
    if min_informative > 0 and bound != "bernstein":
        thin = (stats.informative < min_informative) & (stats.informative < stats.count)
        width = torch.where(thin, torch.maximum(width, bernstein(full)), width)
    return torch.where(n <= 1, full, torch.minimum(width, full))

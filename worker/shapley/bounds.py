"""Confidence half-widths for each player's mean marginal contribution, valid at every sample count.

Two things make an interval the service reports hold:

* **Over players.** The error level is split over them (δ' = δ / n), so the intervals hold *together* at
  level 1 − δ, the union bound the original Neuron Shapley code lacked.
* **Over time.** The bandit looks at the intervals after every round and stops at the first look where they
  separate; a bound valid at one fixed sample count is not valid at such a data-chosen one (with thousands of
  looks, a fixed-n normal interval at δ' = 5·10⁻⁵ is crossed some 60 times as often as it claims). Each bound
  below is therefore a *confidence sequence*: with probability 1 − δ' it holds at every n at once.
  A player's n-th sample is a fresh draw whatever the bandit did before (each walk is a new permutation on a
  new batch), so time-uniform bounds for i.i.d. samples apply to each player's own sequence.

The bounds:

* ``normal`` (default): the two-sided normal-mixture boundary (Robbins 1970; as an asymptotic confidence
  sequence with the sample variance, Waudby-Smith et al. 2024): ``s·√((n+ρ)(ln(1+n/ρ) + 2 ln(1/δ')))/n``.
  At 5·10⁻⁵ (the wide CNN's δ') it is 1.21–1.27× the fixed-n ``z·s/√n`` from 100 to 10,000 samples, where a
  union bound over every n would cost 1.41–1.64×. Asymptotic, like any normal approximation: not rigorous for
  few samples.
* ``bernstein``: empirical Bernstein (Maurer & Pontil 2009) with the range of a marginal known in advance
  (twice the metric's range), at level δ'·w(n) for the n-th sample count, ``w(n) = 1/(C·n·ln²n)``, whose sum
  over n ≥ 2 is below 1 (a union bound over every n). Rigorous, but with accuracy its
  ``7R ln(2/δ'')/(3(n−1))`` term dominates for thousands of samples, so the bandit eliminates almost nobody.
* ``bernstein_observed``: the same with the range observed in the player's marginals so far. Not rigorous
  (the range is estimated), much tighter.

Whatever the bound, a player with fewer than ``min_informative`` informative samples (:mod:`.stats`) and some
uninformative ones gets at least the rigorous ``bernstein`` width: its samples may all be the zeros of walks
truncated before reaching it, whose sample variance of 0 would give the other two a zero-width interval, which
a rare but large marginal would lie outside of. Such a player is undecided anyway; this keeps the interval it is
*reported* with honest. (Without truncation every sample is informative.)
"""

from __future__ import annotations

import torch

from .stats import PlayerStats

__all__ = ["BOUNDS", "MIXTURE_RHO", "UNION_CONSTANT", "half_widths", "union_weight"]

BOUNDS = ("normal", "bernstein", "bernstein_observed")

# ρ of the normal mixture, in samples: against the fixed-n width it costs 1.58× at 10 samples, 1.38× at 20 (the
# bandit's early eliminations) and 1.21–1.27× from 100 to 10,000 (where the threshold's neighbours are decided).
MIXTURE_RHO = 10.0
# Σ_{n≥2} 1/(n ln² n) = 2.1097…, so the weights 1/(UNION_CONSTANT·n·ln² n) sum to less than 1
# (tests/test_certificate.py checks the sum).
UNION_CONSTANT = 2.11


def union_weight(n: torch.Tensor) -> torch.Tensor:
    """Share of a player's error level spent on its interval at sample count ``n`` (≥ 2): summable over n."""
    n = n.clamp_min(2.0)
    return 1.0 / (UNION_CONSTANT * n * torch.log(n) ** 2)


def half_widths(
    stats: PlayerStats,
    bound: str,
    delta: float,
    value_range: float | None,
    min_informative: int = 0,
    delta_each: torch.Tensor | None = None,
) -> torch.Tensor:
    """Half-width of every player's interval, valid at every sample count; players with fewer than two samples
    get the full range, those with fewer than ``min_informative`` informative samples and some truncation zeros
    at least the known-range Bernstein width. ``delta_each`` replaces the even split δ/n with one error level per
    entry (the bandit's pair intervals, whose levels shrink with the order they were opened in)."""
    n_players = stats.count.numel()
    if delta_each is None:
        delta_each = torch.full((n_players,), delta / n_players, dtype=torch.float64)
    n = stats.count.to(torch.float64)
    if value_range is not None:
        full = torch.full_like(n, 2.0 * value_range)
    else:  # unbounded metric: the widest spread of marginals seen in any player
        seen = stats.count > 0
        spread = (stats.high[seen].max() - stats.low[seen].min()).item() if bool(seen.any()) else float("inf")
        full = torch.full_like(n, spread)
    s2 = stats.variance
    log_term = torch.log(2.0 / delta_each) - torch.log(union_weight(n))  # ln(2/δ'') with δ'' = δ'·w(n)

    def bernstein(r: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(2.0 * s2 * log_term / n.clamp_min(1)) + 7.0 * r * log_term / (3.0 * (n - 1).clamp_min(1))

    if bound == "normal":
        rho = MIXTURE_RHO
        boundary = (n + rho) * (torch.log1p(n / rho) + 2.0 * torch.log(1.0 / delta_each))
        width = torch.sqrt(s2 * boundary) / n.clamp_min(1)
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

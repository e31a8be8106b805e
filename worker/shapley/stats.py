"""Per-player statistics of sampled marginal contributions, as mergeable sums.

Counts, sums and sums of squares (float64) plus the smallest and largest
marginal seen: two runs' statistics combine exactly by adding (and min/max),
which is what makes checkpoints, resumes and several workers agree.

``informative`` counts the samples a walk really measured: a walk truncated
before reaching a player records a marginal of 0 for it by definition (the
truncated game's), which says nothing about what the player does when it is
reached. A neuron reached early in only 1–2% of walks can have a dozen such
zeros and a sample variance of 0; no bound may decide it on those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PlayerStats"]

_FIELDS = ("count", "total", "total_sq", "low", "high", "informative")


@dataclass
class PlayerStats:
    count: torch.Tensor  # int64 [n]
    total: torch.Tensor  # float64 [n]
    total_sq: torch.Tensor  # float64 [n]
    low: torch.Tensor  # float64 [n], +inf before any sample
    high: torch.Tensor  # float64 [n], -inf before any sample
    informative: torch.Tensor  # int64 [n]: samples from walks that reached the player before truncating

    @classmethod
    def empty(cls, n: int) -> PlayerStats:
        return cls(
            count=torch.zeros(n, dtype=torch.int64),
            total=torch.zeros(n, dtype=torch.float64),
            total_sq=torch.zeros(n, dtype=torch.float64),
            low=torch.full((n,), float("inf"), dtype=torch.float64),
            high=torch.full((n,), float("-inf"), dtype=torch.float64),
            informative=torch.zeros(n, dtype=torch.int64),
        )

    def add(self, players: torch.Tensor, marginals: torch.Tensor, reached: torch.Tensor) -> None:
        """Record one marginal per entry of ``players``, which may list a player more than once (a round's lanes
        in one call, summed in their order); ``reached`` (bool) marks the marginals that were measured rather
        than set to 0 by truncation."""
        marginals = marginals.to(torch.float64)
        self.count.index_add_(0, players, torch.ones_like(players))
        self.informative.index_add_(0, players, reached.to(torch.int64))
        self.total.index_add_(0, players, marginals)
        self.total_sq.index_add_(0, players, marginals * marginals)
        self.low.scatter_reduce_(0, players, marginals, "amin")
        self.high.scatter_reduce_(0, players, marginals, "amax")

    def merge(self, other: PlayerStats) -> PlayerStats:
        return PlayerStats(
            self.count + other.count,
            self.total + other.total,
            self.total_sq + other.total_sq,
            torch.minimum(self.low, other.low),
            torch.maximum(self.high, other.high),
            self.informative + other.informative,
        )

    def extended(self, extra: int) -> PlayerStats:
        """These statistics followed by ``extra`` empty entries (the bandit's pairs, opened as it goes)."""
        more = PlayerStats.empty(extra)
        return PlayerStats(*(torch.cat([getattr(self, f), getattr(more, f)]) for f in _FIELDS))

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance; 0 below two samples."""
        n = self.count.to(torch.float64)
        var = (self.total_sq - self.total * self.total / n.clamp_min(1)) / (n - 1).clamp_min(1)
        return var.clamp_min(0.0)

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "count": self.count,
            "total": self.total,
            "total_sq": self.total_sq,
            "low": self.low,
            "high": self.high,
            "informative": self.informative,
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> PlayerStats:
        fields = {k: state[k].clone() for k in ("count", "total", "total_sq", "low", "high")}
        # A checkpoint written before ``informative`` existed counted every sample alike; so does its resume.
        fields["informative"] = state["informative"].clone() if "informative" in state else fields["count"].clone()
        return cls(**fields)

"""What a certified stop guarantees: intervals that hold at every look, and a top-k within ε of the truth.

The bandit looks at its intervals after every round and stops at the first look where they separate, so an
interval is only worth reporting if it holds at every sample count at once; and once every player is decided,
the chosen k must each be within ε of the true k-th value whenever the intervals hold. Both are checked here on
the statistics and the decision rule themselves, where thousands of repetitions cost a second.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from worker.shapley import TMABConfig
from worker.shapley.bounds import UNION_CONSTANT, half_widths, union_weight
from worker.shapley.stats import PlayerStats
from worker.shapley.tmab import PAIR_SLOTS, PairBounds, pair_weight, undecided

RUNS, PLAYERS, SAMPLES, DELTA = 400, 25, 600, 0.2
TRUE_MEAN = -0.2 + 0.3


def _three_point_runs() -> torch.Tensor:
    """RUNS × PLAYERS sequences of SAMPLES marginals of a [0, 1] metric (which lie in [-1, 1]): a three-point law,
    mean 0.1, like accuracy flips."""
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(torch.tensor([0.2, 0.5, 0.3]), RUNS * PLAYERS * SAMPLES, True, generator=generator)
    return (draws.to(torch.float64) - 1.0).reshape(RUNS * PLAYERS, SAMPLES)


def _runs_failed(samples: torch.Tensor, width, first: int) -> torch.Tensor:
    """Per run: did any of its players' intervals, ``width(n, stats)`` either side of the mean, exclude the true
    mean at any sample count from ``first`` on?"""
    total, total_sq = samples.cumsum(1), (samples * samples).cumsum(1)
    low, high = samples.cummin(1).values, samples.cummax(1).values
    missed = torch.zeros(len(samples), dtype=torch.bool)
    for n in range(first, samples.shape[1] + 1):
        count = torch.full((len(samples),), n, dtype=torch.int64)
        stats = PlayerStats(count, total[:, n - 1], total_sq[:, n - 1], low[:, n - 1], high[:, n - 1], count)
        missed |= (stats.mean - TRUE_MEAN).abs() > width(n, stats)
    return missed.reshape(RUNS, PLAYERS).any(1)


@pytest.mark.parametrize("bound", ["normal", "bernstein", "bernstein_observed"])
def test_intervals_hold_at_every_look(bound):
    """400 runs of 25 players, 600 samples each, looked at after every sample: the intervals of a run hold
    together at every look in at least 1 − δ of the runs. A fixed-n normal interval at the same level fails
    in most runs (checked below), so this can fail."""
    # The bandit's min_samples (10) for the Bernstein bounds. The normal mixture is asymptotic: below ~50 samples
    # its sample variance is itself too noisy here (from 10 on it failed in 27 % of runs); docs/ESTIMATOR.md says so.
    first = 50 if bound == "normal" else 10
    failed = _runs_failed(
        _three_point_runs(), lambda n, stats: half_widths(stats, bound, DELTA * RUNS, value_range=1.0), first
    )
    assert float(failed.float().mean()) <= DELTA, f"{bound}: a run's intervals failed in {int(failed.sum())} of 400"


def test_a_fixed_sample_interval_fails_under_repeated_looks():
    """The same experiment with the fixed-n interval z·s/√n the estimator used before, from 50 samples on like the
    normal mixture: most runs fail (91 %, where the mixture fails in 14 % and 20 % are allowed)."""
    z = NormalDist().inv_cdf(1.0 - DELTA / PLAYERS / 2.0)
    failed = _runs_failed(_three_point_runs(), lambda n, stats: z * torch.sqrt(stats.variance / n), 50)
    assert float(failed.float().mean()) > 2 * DELTA


def test_union_weights_sum_to_less_than_one():
    """Σ_{n≥2} w(n) over a partial sum plus the integral bound on the tail: the Bernstein bounds' level is spent
    at most once over all sample counts."""
    n = torch.arange(2, 10**6 + 1, dtype=torch.float64)
    tail = 1.0 / (UNION_CONSTANT * math.log(10**6))  # ∫_N^∞ dx / (C x ln² x), above the sum of the rest
    assert float(union_weight(n).sum()) + tail < 1.0


def test_pair_weights_sum_to_less_than_one_and_favour_the_first_slots():
    """The pairs' error level is spent at most once however many pairs are opened: half evenly over the first
    PAIR_SLOTS (which the bandit gives to the closest pairs), the rest over later ones, each below a first slot's."""
    count = 10**6
    weights = pair_weight(count)
    tail = 0.5 * math.log(PAIR_SLOTS + 1) / math.log(count + 1)  # the late half's tail, by the integral as above
    assert float(weights.sum()) + tail < 1.0
    first, late = weights[:PAIR_SLOTS], weights[PAIR_SLOTS:]
    assert torch.all(first == first[0]) and float(late.max()) < float(first[0])


def _edge_intervals(generator: torch.Generator, values: torch.Tensor, widest: float):
    """(estimates, half-widths): intervals that contain ``values`` with the estimate at a random end (the worst
    the intervals allow)."""
    width = torch.rand(values.shape, generator=generator, dtype=torch.float64) * widest
    side = torch.where(torch.rand(values.shape, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
    return values + side * width, width


@pytest.mark.parametrize("with_pairs", [False, True], ids=["players", "pairs"])
@pytest.mark.parametrize("mode", ["top", "bottom"])
def test_a_certified_top_k_is_within_epsilon_of_the_true_kth_value(mode, with_pairs):
    """Random true values with ties and near-ties, random intervals that contain them at their edge: whenever
    the decision rule leaves no player undecided, each chosen player is within ε of the true k-th value. With
    pairs, a random half of the pairs also has an interval of its own on the true difference, often narrower
    than the two players' (the joint samples of a star). With ε instead of ε/2 on each side of the threshold,
    as before this release, it fails in 73 of 5,000 draws without pairs: the guarantee was 2ε."""
    generator = torch.Generator().manual_seed(1)
    cfg = TMABConfig(mode=mode, top_k=5, epsilon=0.01)
    sign = 1.0 if mode == "top" else -1.0
    certified = 0
    n = 12
    everyone = torch.combinations(torch.arange(n))
    for _ in range(5_000):
        truth = torch.round(torch.rand(n, generator=generator, dtype=torch.float64) * 8) / 200  # steps of 0.005
        mean, width = _edge_intervals(generator, truth, 0.01)
        pair_bounds = None
        if with_pairs:
            pairs = everyone[torch.rand(len(everyone), generator=generator) < 0.5]
            diff, pair_width = _edge_intervals(generator, truth[pairs[:, 0]] - truth[pairs[:, 1]], 0.008)
            pair_bounds = PairBounds(pairs, diff - pair_width, diff + pair_width)
        if undecided(mean, mean - width, mean + width, torch.zeros(n, dtype=torch.bool), cfg, pair_bounds).any():
            continue
        certified += 1
        chosen = torch.argsort(sign * mean, descending=True)[: cfg.top_k]
        kth = torch.sort(sign * truth, descending=True).values[cfg.top_k - 1]
        assert bool((sign * truth[chosen] >= kth - cfg.epsilon - 1e-12).all()), (truth, mean, width)
    assert certified > 1_000  # the rule did certify often enough for the check to mean something

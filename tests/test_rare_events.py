"""No player is decided on samples that carry no information: rare-event players in a game of 2,000.

Real networks collapse after a few percent of their channels are removed, so
a walk truncates early and reaches a given neuron before truncating in only
a few percent of walks; every other walk records a 0 for it (its marginal in
the truncated game). A top neuron that matters only when reached early then
has a dozen zeros after a dozen walks, a sample variance of 0, and, under a
bound that trusts it, a zero-width interval below the threshold: eliminated.
"""

from __future__ import annotations

import pytest
import torch

from worker.shapley import TMABConfig, run_tmab

N, COLLAPSE = 2000, 100  # the value is gone once COLLAPSE players are removed (5 % of them)
PLANTED = {7: 0.15, 1234: 0.15, 1999: 0.15}  # each worth 0.15 while fewer than COLLAPSE players are removed
BASE = 1.0 - sum(PLANTED.values())


class CollapsingGame:
    """V(S) = BASE·max(0, 1 − r/COLLAPSE) + Σ_{planted i ∈ S} w_i·[r < COLLAPSE], r = players removed.

    A planted player's Shapley value exceeds an ordinary one's by w_i·COLLAPSE/N = 0.0075 (its weight, times
    the chance that it is removed among the first COLLAPSE): it is a top player, but only in the 5 % of
    walks that reach it before the value collapses and the walk truncates.
    """

    n_players, value_range, max_coalitions_per_pass, rows_per_coalition = N, 1.0, 256, 1

    def __init__(self) -> None:
        self.weights = torch.zeros(N, dtype=torch.float64)
        for i, w in PLANTED.items():
            self.weights[i] = w

    def sample(self, generator: torch.Generator, lanes: int) -> None:
        return None

    def evaluate(self, sample: None, masks: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
        removed = (~masks).sum(1).double()
        alive = (removed < COLLAPSE).double()
        return BASE * (1 - removed / COLLAPSE).clamp_min(0) + alive * (masks.double() @ self.weights)


def exact_values() -> torch.Tensor:
    """Closed form: the base's share is symmetric; a planted player adds w_i·P(removed among the first COLLAPSE),
    and the player removed at step COLLAPSE takes the planted weights still in (symmetric again)."""
    base = torch.full((N,), BASE / N, dtype=torch.float64)
    # The weights still present at the collapse go to whoever is removed at step COLLAPSE: by symmetry each player
    # gets E[Σ_{planted j ≠ i, j not yet removed}] / N; planted i also gets its own w_i·COLLAPSE/N.
    values = base.clone()
    for i, w in PLANTED.items():
        survives = w * (N - COLLAPSE) / (N - 1)  # P(j not among the first COLLAPSE−1 of the others), times w
        values += survives / N
        values[i] -= survives / N
        values[i] += w * COLLAPSE / N
    return values


def test_the_closed_form_is_right():
    """Efficiency: the values add up to V(all) − V(∅)."""
    values = exact_values()
    assert float(values.sum()) == pytest.approx(1.0, abs=1e-12)
    top = set(torch.topk(values, len(PLANTED)).indices.tolist())
    assert top == set(PLANTED)
    fourth = float(torch.sort(values, descending=True).values[len(PLANTED)])
    assert min(float(values[i]) for i in PLANTED) - fourth > 0.005  # clear of ε: not a near-tie


@pytest.mark.slow
@pytest.mark.parametrize("bound", ["normal", "bernstein", "bernstein_observed"])
def test_planted_top_players_are_never_eliminated(bound):
    eliminated: list[tuple[int, int]] = []
    zero_width_decisions: list[int] = []

    def watch(progress) -> None:
        estimate = progress.estimate
        for i in PLANTED:
            if estimate.status[i] == "out":
                eliminated.append((estimate.iterations, i))
        decided = torch.tensor([s != "undecided" for s in estimate.status])
        zero_width = estimate.upper - estimate.lower <= 0
        zero_width_decisions.extend(torch.nonzero(decided & zero_width).squeeze(1).tolist())

    estimate = run_tmab(
        CollapsingGame(),
        TMABConfig(mode="top", top_k=len(PLANTED), bound=bound, seed=3, max_iterations=160),
        on_progress=watch,
    )
    assert estimate.iterations == 160
    assert eliminated == []
    assert zero_width_decisions == []
    # The walks did truncate (so the zeros were there to mislead), and the planted players are still in play.
    assert float((estimate.informative < estimate.samples / 4).double().mean()) > 0.9
    assert all(estimate.status[i] in ("top", "undecided") for i in PLANTED)


@pytest.mark.parametrize("bound", ["normal", "bernstein", "bernstein_observed"])
def test_a_player_seen_only_as_truncation_zeros_is_reported_with_an_interval_that_holds(bound):
    """After a dozen walks most players have only the zeros of walks truncated before them: the interval a result
    reports for them must not be the zero width their sample variance gives, which excludes a planted value."""
    estimate = run_tmab(
        CollapsingGame(), TMABConfig(mode="top", top_k=len(PLANTED), bound=bound, seed=3, max_iterations=12)
    )
    thin = (estimate.informative < TMABConfig().min_samples) & (estimate.informative < estimate.samples)
    assert int(thin.sum()) > N // 2  # the walks did truncate before most players
    assert bool((estimate.upper - estimate.lower)[thin].gt(0).all())
    exact, planted = exact_values(), torch.tensor(list(PLANTED))
    assert bool((estimate.lower[planted] <= exact[planted]).all() and (exact[planted] <= estimate.upper[planted]).all())

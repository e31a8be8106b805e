"""The estimator on games whose Shapley values are known in closed form."""

from __future__ import annotations

import pytest
import torch

from worker.shapley import SpecError, TMABConfig, exact_shapley, run_tmab, tmab

UNTRUNCATED = dict(mode="all", truncation=0.0, half_width=1e-9)


class FunctionGame:
    """V(S) = f(S): no data, deterministic."""

    max_coalitions_per_pass = 64
    rows_per_coalition = 1

    def __init__(self, n: int, f, value_range: float | None = 1.0) -> None:
        self.n_players, self.f, self.value_range = n, f, value_range
        self.evaluated = 0

    def sample(self, generator: torch.Generator, lanes: int):
        return None

    def evaluate(self, sample, masks: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
        self.evaluated += len(masks)
        return self.f(masks).to(torch.float64)


class NoisyAdditiveGame(FunctionGame):
    """V(S) = Σ_{i∈S} (w_i + noise): every batch (lane) draws its own noise, so marginals vary around w_i."""

    def __init__(self, weights: torch.Tensor, noise: float) -> None:
        super().__init__(len(weights), None, value_range=None)
        self.weights, self.noise = weights.double(), noise

    def sample(self, generator: torch.Generator, lanes: int):
        return self.weights + self.noise * torch.randn(lanes, self.n_players, generator=generator, dtype=torch.float64)

    def evaluate(self, sample, masks, lanes):
        self.evaluated += len(masks)
        return (masks.double() * sample[lanes]).sum(1)


def additive(weights: torch.Tensor) -> FunctionGame:
    return FunctionGame(len(weights), lambda m: m.double() @ weights.double())


def unanimity(n: int, carriers: list[int]) -> FunctionGame:
    return FunctionGame(n, lambda m: m[:, carriers].all(1).double())


def test_exact_enumeration_matches_closed_forms():
    w = torch.tensor([0.5, -0.2, 0.0, 0.9, 0.1])
    assert torch.allclose(exact_shapley(additive(w).f, 5), w.double())
    phi = exact_shapley(unanimity(6, [1, 3, 4]).f, 6)
    assert torch.allclose(phi, torch.tensor([0, 1 / 3, 0, 1 / 3, 1 / 3, 0], dtype=torch.float64))


@pytest.mark.parametrize("bound", ["normal", "bernstein", "bernstein_observed"])
def test_untruncated_intervals_contain_exact_values(bound):
    game = unanimity(8, [0, 2, 5])
    exact = exact_shapley(game.f, 8)
    est = run_tmab(game, TMABConfig(**UNTRUNCATED, bound=bound, max_iterations=400, seed=3))
    assert ((est.lower <= exact) & (exact <= est.upper)).all(), (est.lower, exact, est.upper)
    assert (est.values - exact).abs().max() < 0.1
    assert est.stop_reason == "max_iterations" and est.iterations == 400


def test_rigorous_bound_is_wider_than_practical_ones():
    game = unanimity(8, [0, 2, 5])
    widths = {}
    for bound in ("normal", "bernstein", "bernstein_observed"):
        est = run_tmab(game, TMABConfig(**UNTRUNCATED, bound=bound, max_iterations=200))
        widths[bound] = float((est.upper - est.lower).mean())
    assert widths["bernstein"] > widths["bernstein_observed"] > 0
    assert widths["bernstein"] > widths["normal"] > 0


def test_each_untruncated_iteration_is_efficient():
    """Σ_i marginal_i = V(all) − V(∅) for every single permutation."""
    w = torch.rand(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    game = FunctionGame(12, lambda m: (m.double() @ w) ** 2)  # not additive: marginals vary by order
    for seed in range(5):
        est = run_tmab(game, TMABConfig(**UNTRUNCATED, lanes=1, max_iterations=1, seed=seed))
        assert est.v_full == pytest.approx(w.sum().item() ** 2, abs=1e-12) and est.v_empty == 0.0
        assert est.values.sum().item() == pytest.approx(est.v_full - est.v_empty, abs=1e-12)


def test_null_players_get_exactly_zero_and_symmetric_players_agree():
    # players 0 and 1 are interchangeable, player 4 never matters
    game = FunctionGame(6, lambda m: (m[:, 0] | m[:, 1]).double() * 0.5 + m[:, 2].double() * m[:, 3].double() * 0.3)
    exact = exact_shapley(game.f, 6)
    assert exact[4] == 0 and exact[0] == pytest.approx(exact[1].item())
    est = run_tmab(game, TMABConfig(**UNTRUNCATED, max_iterations=300))
    assert est.values[4] == 0.0 and est.values[5] == 0.0
    assert (est.lower[0] <= exact[1]) and (exact[1] <= est.upper[0])
    assert (est.lower[1] <= exact[0]) and (exact[0] <= est.upper[1])


def test_truncation_saves_evaluations_and_zeroes_late_marginals():
    game = unanimity(30, [0, 1])  # V(S) collapses to V(∅) as soon as player 0 or 1 is gone
    no_bandit = dict(min_samples=10**9, lanes=1, coalitions_per_pass=4, max_iterations=40, seed=1)
    full = run_tmab(game, TMABConfig(**UNTRUNCATED, **no_bandit))
    cut = run_tmab(game, TMABConfig(mode="all", half_width=1e-9, truncation=0.1, patience=3, **no_bandit))
    assert full.evaluations == 40 * (30 + 1)  # every step but the empty coalition, plus V(all) and V(∅)
    assert cut.evaluations < 0.7 * full.evaluations
    assert cut.values[2:].abs().max() == 0.0  # null players stay exactly 0
    assert cut.values[:2].sum().item() == pytest.approx(1.0)  # the value is still split between the carriers


@pytest.mark.parametrize("mode", ["top", "bottom"])
def test_bandit_finds_top_and_bottom_players_and_stops(mode):
    weights = torch.linspace(-1, 1, 40)
    game = NoisyAdditiveGame(weights, noise=0.3)
    est = run_tmab(game, TMABConfig(mode=mode, top_k=5, max_iterations=5000, seed=7))
    assert est.stop_reason == "converged"
    chosen = {i for i, s in enumerate(est.status) if s == mode}
    expected = set(range(35, 40)) if mode == "top" else set(range(5))
    assert chosen == expected
    assert "undecided" not in est.status
    # the bandit stopped sampling far-away players early
    assert est.samples.min() < est.samples.max() / 3


def test_star_rounds_take_over_once_few_players_are_active_and_stay_exact():
    """Once a walk would cost more than 1 + A evaluations per lane, rounds sample star coalitions (each active player
    flipped in one random coalition); their samples are exact Shapley samples, so a non-additive game's exact
    values stay inside the intervals and the top 3 come out right."""
    w = torch.rand(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = lambda m: (m.double() @ w) ** 2 / float(w.sum()) ** 2  # noqa: E731 - marginals depend on the coalition
    exact = exact_shapley(f, 12)
    for seed in range(3):
        est = run_tmab(FunctionGame(12, f), TMABConfig(mode="top", top_k=3, truncation=0.0, seed=seed))
        assert est.stop_reason == "converged"
        assert est.walks == 12 < est.iterations  # three rounds of walks (min_samples), then stars
        assert ((est.lower <= exact) & (exact <= est.upper)).all()
        assert {i for i, s in enumerate(est.status) if s == "top"} == set(torch.topk(exact, 3).indices.tolist())
        assert est.v_full == pytest.approx(1.0) and est.v_empty == 0.0  # averaged over the walks alone


def test_all_mode_reaches_target_half_width():
    game = NoisyAdditiveGame(torch.linspace(0, 1, 10), noise=0.2)
    est = run_tmab(game, TMABConfig(mode="all", half_width=0.05, max_iterations=20000))
    assert est.stop_reason == "converged"
    assert ((est.upper - est.lower) / 2 <= 0.05).all()
    assert set(est.status) == {"decided"}


def test_same_seed_same_result_other_seed_other_result():
    game = NoisyAdditiveGame(torch.linspace(-1, 1, 30), noise=0.5)
    cfg = TMABConfig(mode="top", top_k=3, max_iterations=60, seed=11)
    a, b = run_tmab(game, cfg), run_tmab(game, cfg)
    assert torch.equal(a.values, b.values) and torch.equal(a.samples, b.samples) and a.status == b.status
    c = run_tmab(game, TMABConfig(mode="top", top_k=3, max_iterations=60, seed=12))
    assert not torch.equal(a.values, c.values)


def test_pair_intervals_settle_a_near_tie_of_correlated_players_sooner(monkeypatch):
    """In a game whose marginals all grow with the coalition's weight, two players' star samples move together:
    the interval of their difference is far narrower than their two intervals side by side, so the endgame's
    pairs certify the top 3 in a fraction of the samples, and the answer stays exact."""
    w = torch.arange(1, 13, dtype=torch.float64)
    f = lambda m: (m.double() @ w) ** 2 / float(w.sum()) ** 2  # noqa: E731 - marginals depend on the coalition
    exact = exact_shapley(f, 12)
    cfg = TMABConfig(mode="top", top_k=3, truncation=0.0, seed=0)
    with_pairs = run_tmab(FunctionGame(12, f), cfg)
    monkeypatch.setattr(tmab, "PAIR_CAP", 0)  # no pair is ever opened
    without = run_tmab(FunctionGame(12, f), cfg)
    for est in (with_pairs, without):
        assert est.stop_reason == "converged"
        assert {i for i, s in enumerate(est.status) if s == "top"} == {9, 10, 11}
        assert ((est.lower <= exact) & (exact <= est.upper)).all()
    assert with_pairs.pair_intervals > 0 and without.pair_intervals == 0
    assert with_pairs.iterations * 4 < without.iterations


def test_the_closest_pairs_get_the_first_slots():
    """The first pairs opened get the largest share of δ, so a round that opens many gives them to the pairs
    whose means are closest, the ones a pair interval is for (a pair far apart is settled by the players' own
    intervals): checked on the checkpoint of the round that first opens pairs, with the statistics they were
    ordered by."""
    game = NoisyAdditiveGame(torch.linspace(0, 1, 16) ** 2, noise=0.3)
    first_opened: list[tmab._State] = []

    def on_progress(progress):
        state = tmab._State.from_bytes(progress.checkpoint())
        if len(state.pairs) and not first_opened:
            first_opened.append(state)

    run_tmab(game, TMABConfig(mode="top", top_k=8, max_iterations=400, seed=3), on_progress=on_progress)
    (state,) = first_opened
    mean = state.stats.mean
    gaps = (mean[state.pairs[:, 0]] - mean[state.pairs[:, 1]]).abs()
    assert len(gaps) >= 4 and torch.all(gaps[1:] >= gaps[:-1])


def test_interrupted_and_resumed_equals_uninterrupted():
    game = NoisyAdditiveGame(torch.linspace(-1, 1, 30), noise=0.5)
    cfg = TMABConfig(mode="top", top_k=3, max_iterations=80, seed=5, lanes=4)
    whole = run_tmab(game, cfg)

    saved: list[bytes] = []
    stop_after_rounds = 7

    def on_progress(progress):
        saved.append(progress.checkpoint())

    partial = run_tmab(game, cfg, on_progress=on_progress, should_stop=lambda: len(saved) >= stop_after_rounds)
    assert partial.stop_reason == "stopped" and len(saved) == stop_after_rounds
    assert partial.walks < partial.iterations  # the checkpoint is taken after star rounds, which resume too
    assert partial.pair_intervals > 0  # and after pair intervals were opened, which the checkpoint carries
    resumed = run_tmab(game, cfg, resume_from=saved[-1])
    assert torch.equal(resumed.values, whole.values)
    assert torch.equal(resumed.samples, whole.samples)
    assert resumed.status == whole.status
    assert (resumed.iterations, resumed.evaluations) == (whole.iterations, whole.evaluations)
    assert torch.equal(resumed.upper, whole.upper) and resumed.pair_intervals == whole.pair_intervals


def test_budgets_stop_the_run_with_honest_bounds():
    game = NoisyAdditiveGame(torch.linspace(-1, 1, 50), noise=2.0)
    by_evals = run_tmab(game, TMABConfig(max_evaluations=500))
    assert by_evals.stop_reason == "max_evaluations" and by_evals.evaluations >= 500
    assert "undecided" in by_evals.status
    by_time = run_tmab(game, TMABConfig(max_seconds=0.2))
    assert by_time.stop_reason == "max_seconds" and by_time.elapsed_s < 1.0


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(top_k=50), "top_k must be between 1 and 9"),
        (dict(delta=0.0), "delta must be in (0, 1)"),
        (dict(max_iterations=0), "max_iterations must be positive"),
        (dict(mode="median"), "mode must be one of"),
        (dict(truncation=1.5), "truncation must be in [0, 1)"),
        (dict(bound="hoeffding"), "bound must be one of"),
    ],
)
def test_settings_that_make_no_sense_are_refused(settings, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run_tmab(additive(torch.ones(10)), TMABConfig(**settings))


def test_corrupt_checkpoint_is_a_clear_error():
    with pytest.raises(SpecError, match="checkpoint cannot be read"):
        run_tmab(additive(torch.ones(4)), resume_from=b"not a checkpoint")

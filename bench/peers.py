"""Peers a user would pick instead of TMAB, run on the same game until each first gives a correct top-10.

None of them has a stopping rule of its own, so each is grown in steps (Captum one permutation at a time,
shapiq's approximators with budgets doubling, each run from scratch with a fixed seed) and checked after every
step against the benchmark's correctness test; what we report is the CPU time (bench_estimator's 'Clock')
until the first correct step.
Every peer evaluates coalitions with ``NeuronGame.full_values`` (the whole-set, untruncated game), so its time
is the estimator's own work, not a slower engine's.

shapiq's games are built with ``normalize=False``: the values are the raw metric. A Shapley value is an average
of differences of values, so the empty coalition's value (which shapiq would otherwise subtract from every
value) changes none of them; KernelSHAP's efficiency constraint uses v(N) - v(empty), equally unchanged.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from worker.shapley import NeuronGame

Correct = Callable[[torch.Tensor], bool]  # a top-10 check against the benchmark's reference


class OutOfTime(Exception):
    """Raised from inside a peer's game evaluation once its cumulative cap has passed (peers cannot be told
    to stop otherwise)."""


@dataclass
class PeerResult:
    """What a peer took to its first correct top-10, or why it did not get there (``note``)."""

    name: str
    evaluations: int | None = None  # shapiq: its budget; Captum: coalitions evaluated, its baselines included
    permutations: int | None = None  # Captum and permutation sampling only
    run_s: float | None = None  # that step's own run (shapiq: the run at that budget, from scratch)
    cumulative_s: float = 0.0  # every step until then (or until it gave up), which a user would also pay
    correct: bool = False  # it got there within its cap
    note: str = ""
    steps: list[tuple[int, float, bool]] = field(default_factory=list)  # (budget, run s, correct) per step


def _deadline_values(game: NeuronGame, deadline: float, counter: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``full_values`` in passes of at most the game's ``max_coalitions_per_pass``, stopping at ``deadline``."""
    per_pass = max(1, game.max_coalitions_per_pass)

    def values(gates: torch.Tensor) -> torch.Tensor:
        outs = []
        for start in range(0, gates.shape[0], per_pass):
            if time.process_time() > deadline:
                raise OutOfTime
            chunk = gates[start : start + per_pass]
            outs.append(game.full_values(chunk).double())
            counter[0] += chunk.shape[0]
        return torch.cat(outs)

    return values


# --------------------------------------------------------------------------- Captum


def captum_first_correct(game: NeuronGame, correct: Correct, cap_s: float, per_eval: int, seed: int) -> PeerResult:
    """Captum's ``ShapleyValueSampling`` over a gate vector, one permutation per call (torch seed ``seed + i``),
    averaged, checked after each: the same estimator as one call with ``n_samples`` permutations, seen at every
    permutation. Each call also evaluates the baseline once (n + 1 evaluations per permutation, not n)."""
    from captum.attr import ShapleyValueSampling

    n = game.n_players
    evaluations = [0]
    start = time.process_time()
    values = _deadline_values(game, start + cap_s, evaluations)
    svs = ShapleyValueSampling(lambda gates: values(gates).float())
    total = torch.zeros(n, dtype=torch.float64)
    result = PeerResult(f"Captum ShapleyValueSampling (ppe={per_eval})")
    permutations = 0
    try:
        while True:
            torch.manual_seed(seed + permutations)
            attr = svs.attribute(
                torch.ones(1, n), baselines=torch.zeros(1, n), n_samples=1, perturbations_per_eval=per_eval
            )
            total += attr[0].double()
            permutations += 1
            if correct(total / permutations):
                result.correct = True
                break
    except OutOfTime:
        result.note = f"not within its {cap_s:.0f} s cap ({permutations} permutations done)"
    result.evaluations, result.permutations = evaluations[0], permutations
    result.run_s = result.cumulative_s = time.process_time() - start
    return result


# --------------------------------------------------------------------------- shapiq


def shapiq_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("shapiq")
    except Exception:  # not installed (PackageNotFoundError) or broken metadata
        return None


@dataclass(frozen=True)
class Approximator:
    """One shapiq approximator as the benchmark drives it."""

    name: str
    start_budget: Callable[[int], int]  # its smallest sensible budget for n players
    why_start: str
    pattern: str  # how it calls the game: "walk" (a permutation's prefixes), "random" or "single" (one per call)
    overhead_exponent: int  # its own work grows as n ** this x budget (probed on a free game)


APPROXIMATORS = (
    Approximator(
        "PermutationSamplingSV", lambda n: 2 + (n - 1), "one permutation (n - 1 coalitions + the two ends)", "walk", 1
    ),
    Approximator("SVARM", lambda n: 2 * n, "two samples per player", "random", 2),
    Approximator("KernelSHAP", lambda n: 2 * n, "its regression needs more than n + 1 evaluations", "random", 2),
    Approximator(
        "StratifiedSamplingSV",
        lambda n: 2 * n * (n - 1),
        "one sample in every (player, size) stratum: below that only the smallest sizes are sampled",
        "single",
        0,
    ),
)


def _shapiq_game(n: int, values: Callable[[torch.Tensor], torch.Tensor]):
    """A shapiq ``Game`` whose value function is ``values`` on boolean coalitions; raw metric (see above)."""
    import shapiq

    class NeuronShapiqGame(shapiq.Game):
        def __init__(self) -> None:
            super().__init__(n_players=n, normalize=False)

        def value_function(self, coalitions: np.ndarray) -> np.ndarray:
            return values(torch.from_numpy(np.ascontiguousarray(coalitions)).float()).numpy()

    return NeuronShapiqGame()


def _approximate(name: str, n: int, budget: int, game, seed: int) -> np.ndarray:
    import shapiq.approximator as approximators

    iv = getattr(approximators, name)(n=n, random_state=seed).approximate(budget, game)
    return np.asarray(iv.get_n_order_values(1), dtype=np.float64)


def _overhead_per_unit(approx: Approximator, probe_players: int, seed: int) -> float:
    """Seconds of the approximator's own work per (n ** exponent x budget), on a free linear game of
    ``probe_players`` players at 4 x that budget: what its bookkeeping costs when the game costs nothing."""
    n = probe_players
    weights = torch.linspace(1.0, 0.0, n, dtype=torch.float64)
    game = _shapiq_game(n, lambda gates: gates.double() @ weights)
    budget = 4 * n
    t = time.process_time()
    _approximate(approx.name, n, budget, game, seed)
    return (time.process_time() - t) / (n**approx.overhead_exponent * budget)


def _seconds_per_evaluation(game: NeuronGame, pattern: str, seed: int) -> float:
    """Measured cost of one coalition on the whole-set game as the approximator calls it (see ``pattern``), 16
    per call when it batches: enough to show what grouping gains on a walk, few enough to keep this short."""
    gen = torch.Generator().manual_seed(seed)
    n = game.n_players
    m = 1 if pattern == "single" else min(16, max(1, game.max_coalitions_per_pass))
    if pattern == "walk":
        rank = torch.empty(n, dtype=torch.long)
        rank[torch.randperm(n, generator=gen)] = torch.arange(n)
        masks = rank.unsqueeze(0) < torch.arange(n // 2, n // 2 + m).unsqueeze(1)  # consecutive prefixes
    else:
        masks = torch.rand(m, n, generator=gen) < 0.5
    game.full_values(masks)  # warm-up
    t = time.process_time()
    game.full_values(masks)
    return (time.process_time() - t) / m


def shapiq_first_correct(
    approx: Approximator, game: NeuronGame, correct: Correct, cap_s: float, seed: int, probe_players: int
) -> PeerResult:
    """Budgets doubling from the approximator's smallest sensible one, each run from scratch with ``seed``,
    until its top-10 is correct or the cumulative time would pass ``cap_s``. A budget is not started when its
    predicted time (twice the last run's; for the first, measured cost per evaluation x budget plus the
    approximator's own probed work) would end past the cap."""
    n = game.n_players
    result = PeerResult(f"shapiq {approx.name}")
    budget = approx.start_budget(n)
    if approx.name == "KernelSHAP" and math.comb(n, n // 2) > sys.float_info.max:
        result.note = f"skipped: shapiq's kernel weights binom({n}, k) overflow float64, so it returns NaN"
        return result
    overhead = _overhead_per_unit(approx, min(n, probe_players), seed) * n**approx.overhead_exponent
    predicted = budget * (_seconds_per_evaluation(game, approx.pattern, seed) + overhead)
    if predicted > cap_s:
        result.note = (
            f"skipped: its smallest sensible budget, {budget:,} ({approx.why_start}), would take ~{predicted:,.0f} s "
            f"(measured per evaluation and probed), over its {cap_s:.0f} s cap"
        )
        return result
    cumulative = 0.0
    while True:
        evaluations = [0]
        t = time.process_time()
        values = _deadline_values(game, t + cap_s - cumulative, evaluations)
        try:
            estimate = _approximate(approx.name, n, budget, _shapiq_game(n, values), seed)
        except OutOfTime:
            result.cumulative_s = cumulative + time.process_time() - t
            result.note = f"not within its {cap_s:.0f} s cap (budget {budget:,} interrupted)"
            return result
        run_s = time.process_time() - t
        cumulative += run_s
        result.cumulative_s = cumulative
        ok = bool(np.isfinite(estimate).all()) and correct(torch.from_numpy(estimate))
        result.steps.append((budget, run_s, ok))
        if ok:
            result.correct, result.evaluations, result.run_s = True, budget, run_s
            if approx.name == "PermutationSamplingSV":
                result.permutations = (budget - 2) // (n - 1)
            return result
        if cumulative + 2 * run_s > cap_s:
            result.note = (
                f"not within its {cap_s:.0f} s cap (largest budget {budget:,}, {cumulative:.0f} s; the next, "
                f"{2 * budget:,}, would end past the cap)"
            )
            return result
        budget *= 2

"""Estimates as users read them: ranked neuron objects (docs/API.md's shape) and run metadata."""

from __future__ import annotations

from dataclasses import asdict

import torch

from .game import NeuronGame
from .tmab import Estimate, TMABConfig

__all__ = ["ranked_neurons", "run_summary", "evidence", "warnings", "no_evidence_message", "eta_s"]


def ranked_neurons(game: NeuronGame, estimate: Estimate) -> list[dict]:
    """Every neuron, highest value first, as ``{rank, layer, index, value, lower, upper, samples, status}``."""
    names = game.player_names()
    order = torch.argsort(estimate.values, descending=True, stable=True).tolist()
    values, lower, upper = estimate.values.tolist(), estimate.lower.tolist(), estimate.upper.tolist()
    samples = estimate.samples.tolist()
    return [
        {
            "rank": rank,
            "layer": names[i][0],
            "index": names[i][1],
            "value": values[i],
            "lower": lower[i],
            "upper": upper[i],
            "samples": samples[i],
            "status": estimate.status[i],
        }
        for rank, i in enumerate(order, start=1)
    ]


def run_summary(game: NeuronGame, estimate: Estimate) -> dict:
    """How the values were produced: game, estimator settings (bound included) and the run's counters."""
    return {
        "game": game.describe(),
        "estimator": asdict(estimate.config),
        "players": game.n_players,
        "undecided": estimate.status.count("undecided"),
        "iterations": estimate.iterations,
        "walks": estimate.walks,
        "evaluations": estimate.evaluations,
        "forward_rows": estimate.rows,
        "elapsed_s": estimate.elapsed_s,
        "v_full": estimate.v_full,
        "v_empty": estimate.v_empty,
        "stop_reason": estimate.stop_reason,
        "setup_s": estimate.setup_s,
        "discarded_evaluations": estimate.discarded_evaluations,
        "pair_intervals": estimate.pair_intervals,
        "evidence": evidence(estimate),
        "warnings": warnings(estimate),
    }


def evidence(estimate: Estimate) -> dict:
    """How much the values rest on: informative samples (marginals walks really measured) per player."""
    informative = estimate.informative
    n = informative.numel()
    return {
        "informative_min": int(informative.min()) if n else 0,
        "informative_median": int(informative.median()) if n else 0,
        "players_without_information": int((informative == 0).sum()),
    }


def _budget_hint(estimate: Estimate) -> str:
    reason = estimate.stop_reason
    if reason in ("max_seconds", "max_iterations", "max_evaluations"):
        return f"raise estimator.{reason} (--{reason.replace('_', '-')})"
    return "let the run go on longer"


def no_evidence_message(estimate: Estimate) -> str | None:
    """Why a result with no informative sample at all says nothing, and what to raise; None when it has some."""
    if estimate.informative.numel() and int(estimate.informative.max()) > 0:
        return None
    if estimate.stop_reason == "max_seconds":
        spent = (
            f"the run stopped at its max_seconds budget after {estimate.elapsed_s:.1f} s, "
            f"{estimate.setup_s:.1f} s of them loading the model and building the game, "
        )
    else:
        spent = f"the run stopped ({estimate.stop_reason}) after {estimate.elapsed_s:.1f} s "
    return (
        f"No neuron got an informative sample: {spent}before its first round of {estimate.config.lanes} walks "
        f"ended ({estimate.discarded_evaluations} evaluations of the unfinished round were discarded), so every "
        f"value is a placeholder 0. {_budget_hint(estimate).capitalize()}, or make rounds cheaper "
        "(fewer layers, a smaller batch_size)."
    )


def warnings(estimate: Estimate) -> list[str]:
    """What a reader of the result must know: players without evidence, neurons left undecided by a budget."""
    out = []
    message = no_evidence_message(estimate)
    if message is not None:
        out.append(message)
    else:
        missing = int((estimate.informative == 0).sum())
        if missing:
            out.append(
                f"{missing} of {estimate.informative.numel()} neurons got no informative sample (every walk was "
                f"truncated before reaching them): their values are 0 by default, not measured; "
                f"{_budget_hint(estimate)}."
            )
    undecided = estimate.status.count("undecided")
    if undecided and estimate.stop_reason != "converged":
        out.append(
            f"{undecided} of {len(estimate.status)} neurons are undecided: the run stopped "
            f"({estimate.stop_reason}) before their bounds settled; {_budget_hint(estimate)} to decide them."
        )
    return out


def eta_s(config: TMABConfig, elapsed_s: float, iterations: int, evaluations: int) -> float | None:
    """Seconds until the nearest budget: ``max_seconds`` minus the time used (known from the start), the
    iteration and evaluation budgets at the rate so far. None without a budget: when the bandit will have decided
    every neuron depends on how close the last ones sit to the threshold, which the rate so far does not tell."""
    left = []
    if config.max_seconds is not None:
        left.append(config.max_seconds - elapsed_s)
    if elapsed_s > 0:
        if config.max_iterations is not None and iterations:
            left.append(elapsed_s * (config.max_iterations - iterations) / iterations)
        if config.max_evaluations is not None and evaluations:
            left.append(elapsed_s * (config.max_evaluations - evaluations) / evaluations)
    return round(max(0.0, min(left)), 1) if left else None

"""Estimates as users read them: ranked neuron objects (docs/API.md's shape) and run metadata."""

from __future__ import annotations

from dataclasses import asdict

import torch

from .game import NeuronGame
from .tmab import Estimate

__all__ = ["ranked_neurons", "run_summary"]


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
        "evaluations": estimate.evaluations,
        "forward_rows": estimate.rows,
        "elapsed_s": estimate.elapsed_s,
        "v_full": estimate.v_full,
        "v_empty": estimate.v_empty,
        "stop_reason": estimate.stop_reason,
    }

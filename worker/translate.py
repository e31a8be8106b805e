"""The job spec in the estimator library's terms: the one translator, used by the runner and ``neuronshap estimate``.

:class:`app.jobs.spec.JobSpec` is what users write (torch-free, validated
before anything loads); the library takes a :class:`MetricSpec`, layer
globs, an ablation policy and a :class:`TMABConfig`. What depends on the
model (how many neurons the layers have, so which ``top_k`` makes sense) is
settled here, once the game exists.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from app.jobs.spec import DEFAULT_TOP_K, EstimatorSpec, JobSpec
from worker.shapley import MetricSpec, NeuronGame, TMABConfig, load_data, load_model
from worker.shapley.errors import SpecError
from worker.shapley.game import BuildTimeout

__all__ = ["build_game", "tmab_config", "OutOfTime"]

# The estimator settings the spec and TMABConfig share, by name; batch_size belongs to the game.
_TMAB_FIELDS = (
    "mode",
    "delta",
    "epsilon",
    "half_width",
    "bound",
    "truncation",
    "patience",
    "seed",
    "max_iterations",
    "max_evaluations",
    "max_seconds",
)


class OutOfTime(Exception):
    """``max_seconds`` ran out while loading or building the game: nothing can be measured."""


def build_game(
    spec: JobSpec,
    model_path: Path | str,
    data_path: Path | str,
    device: str | None = None,
    started_at: float | None = None,
    memory_bytes: int | None = None,
) -> tuple[NeuronGame, TMABConfig]:
    """Load the model and data and make the game and the estimator settings ``spec`` asks for.

    With ``started_at`` (``time.monotonic()`` when the run began) and a ``max_seconds`` budget, raises
    :class:`OutOfTime` when the budget is spent while loading or while building the game (its checks run the
    model, which on a big one takes seconds: they stop between two nodes at the deadline), rather than go on
    with a game it has no time to play. ``memory_bytes`` bounds the activations of one forward pass
    (``NEURONSHAP_ACTIVATION_MEMORY_MB``; ``None``: the library's default).
    """
    metric = spec.metric
    model, data = load_model(model_path), load_data(data_path)
    budget = spec.estimator.max_seconds
    deadline = None if started_at is None or budget is None else started_at + budget

    def out_of_time(stage: str) -> OutOfTime:
        assert started_at is not None and budget is not None
        return OutOfTime(
            f"No neuron got an informative sample: the max_seconds budget ({budget:g} s) ran out {stage} "
            f"({time.monotonic() - started_at:.1f} s). Raise estimator.max_seconds (--max-seconds), "
            "or choose fewer layers."
        )

    if deadline is not None and time.monotonic() >= deadline:
        raise out_of_time("while the model and data were loading, before the game was built")
    try:
        game = NeuronGame(
            model,
            data,
            MetricSpec(
                metric.name,
                class_=metric.class_,
                group=metric.group,
                groups=(metric.groups[0], metric.groups[1]) if metric.groups else None,
            ),
            layers=spec.players.layers,
            ablation=spec.players.ablation,
            batch_size=spec.estimator.batch_size,
            device=device,
            memory_bytes=memory_bytes,
            deadline=deadline,
        )
    except BuildTimeout:
        raise out_of_time("while the game was being built (its load-time checks run the model)") from None
    return game, tmab_config(spec.estimator, game.n_players)


def tmab_config(estimator: EstimatorSpec, n_players: int) -> TMABConfig:
    """The run's settings for a game of ``n_players``; an unset ``top_k`` is 10, or n − 1 for a smaller game."""
    config = TMABConfig(**{name: getattr(estimator, name) for name in _TMAB_FIELDS})
    if estimator.top_k is not None:
        config = replace(config, top_k=estimator.top_k)
    elif config.mode != "all":
        if n_players < 2:
            raise SpecError(
                f"The layers chosen have {n_players} neuron; mode {config.mode!r} needs at least two "
                "to rank. Choose more layers, or mode 'all'."
            )
        config = replace(config, top_k=min(DEFAULT_TOP_K, n_players - 1))
    config.validate(n_players)
    return config

"""Acting on a result: remove chosen neurons from the model and measure what that does.

An *edit* takes a finished estimate (the job's ranked neurons) and a
*selection* (docs/API.md, "Acting on a result: edits"), resolves it to a set of
players, and measures the metric before and after removing them, on the job's
data and on optional held-out data, with each group's accuracy where the data
has groups. It never re-runs the estimator: every figure is a forward pass of
the game's own masked model (:meth:`NeuronGame.full_values` on the job's
data, the same prefix/suffix with the same coalition masks on held-out data),
so "after" is exactly what the game computes for that coalition, and the ONNX
file of :mod:`worker.shapley.onnx_export` reproduces it.

Selections (one key of the JSON object):

* ``{"neurons": [{"layer", "index"}, …]}``: exactly these;
* ``{"top": K}`` / ``{"bottom": K}``: the K highest / lowest by estimated value;
* ``{"negative": true}``: every neuron whose upper bound is below 0;
* ``{"repair": {"max_neurons": N}}``: the lowest-valued neurons in order of value; the metric on the held-out
  data is measured after each count 0..N removed and the count with the best one is kept (the fewest on a tie,
  so never worse than removing none); needs held-out data;
* ``{"prune": {"fraction": F}}`` / ``{"prune": {"count": N}}``: the N (or ⌊F·players⌋) lowest-valued neurons, the
  structured-pruning order, with the metric along the way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import EvalData
from .errors import UserInputError
from .game import NeuronGame
from .metrics import Metric

__all__ = [
    "SELECTIONS",
    "CURVE_POINTS",
    "EditError",
    "Selection",
    "resolve_selection",
    "player_ids",
    "run_edit",
]

SELECTIONS = ("neurons", "top", "bottom", "negative", "repair", "prune")
# A prune curve is measured at most at this many counts (every count up to it, evenly spaced beyond): each point
# is a pass over the whole data, and a hundred points draw the curve. A repair measures every count it may keep.
CURVE_POINTS = 101
_CHUNK = 512  # rows (examples × coalitions) per forward pass on held-out data, as NeuronGame.full_values
_RECORD_KEYS = ("layer", "index", "value", "lower", "upper")


class EditError(UserInputError):
    """An edit's input that cannot be acted on; ``field`` names the part to fix (``selection`` or ``data``)."""

    def __init__(self, message: str, field: str = "selection") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Selection:
    """A selection resolved to players.

    ``order`` is the removal order (player ids). A fixed selection removes all of it; ``repair`` and ``prune``
    measure ``counts`` (numbers of players removed from the front of ``order``) and keep ``count`` of them,
    ``repair`` only once the curve is known (``count`` is None until then).
    """

    kind: str
    order: tuple[int, ...]
    counts: tuple[int, ...] | None = None
    count: int | None = None


def player_ids(game: NeuronGame, neurons: Sequence[Mapping[str, Any]], label: str = "selection") -> list[int]:
    """The player id of each ``{"layer", "index"}`` record; an unknown layer or index is an :class:`EditError`.

    ``label`` names the list in the message; the error's field is the selection, where such records come from.
    """
    sizes = {layer.name: layer for layer in game.layers}
    ids = []
    for i, record in enumerate(neurons):
        if not isinstance(record, Mapping) or not {"layer", "index"} <= set(record):
            raise EditError(f'{label}: entry {i} must be an object {{"layer": …, "index": …}}, not {record!r}.')
        name, index = record["layer"], record["index"]
        layer = sizes.get(name) if isinstance(name, str) else None
        if layer is None:
            raise EditError(
                f"{label}: entry {i} names layer {name!r}, which has no neurons in this job; "
                f"its layers are: {', '.join(sizes)}.",
            )
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < layer.size:
            raise EditError(f"{label}: entry {i} has index {index!r}; layer {name!r} has neurons 0..{layer.size - 1}.")
        ids.append(layer.offset + index)
    return ids


def resolve_selection(
    game: NeuronGame, neurons: Sequence[Mapping[str, Any]], selection: Mapping[str, Any], held_out: bool
) -> Selection:
    """Check ``selection`` against the job's ranked ``neurons`` and turn it into players.

    Args:
        game: the job's game (its players are the job's neurons).
        neurons: the job's ranked neurons (``app.jobs.schemas.Neuron`` as dicts), highest value first.
        selection: the selection object as submitted.
        held_out: whether held-out data comes with the edit (``repair`` needs it).
    """
    if not isinstance(selection, Mapping) or len(selection) != 1 or next(iter(selection)) not in SELECTIONS:
        raise EditError(
            f"selection must be an object with exactly one of the keys {', '.join(SELECTIONS)}, "
            f'e.g. {{"top": 5}} or {{"repair": {{"max_neurons": 10}}}}; got {selection!r}.'
        )
    ((kind, arg),) = selection.items()
    n = game.n_players
    player = {name: i for i, name in enumerate(game.player_names())}
    ids = [player.get((r["layer"], r["index"]), -1) for r in neurons]
    if sorted(ids) != list(range(n)):  # not the user's doing: the job's result and its game disagree
        raise ValueError(f"The job's {len(ids)} ranked neurons are not the {n} players of its game.")
    upper = {ids[i]: float(r["upper"]) for i, r in enumerate(neurons)}
    by_value = sorted(range(n), key=lambda i: -float(neurons[i]["value"]))  # stable: ties keep the ranking
    descending = [ids[i] for i in by_value]
    ascending = descending[::-1]
    if kind == "neurons":
        if not isinstance(arg, list) or not arg:
            raise EditError('selection.neurons must be a non-empty list of {"layer": …, "index": …} objects.')
        chosen = player_ids(game, arg, "selection.neurons")
        twice = sorted({i for i in chosen if chosen.count(i) > 1})
        if twice:
            names = game.player_names()
            raise EditError(
                f"selection.neurons lists {', '.join(f'{names[i][0]}[{names[i][1]}]' for i in twice)} twice."
            )
        return Selection(kind, tuple(chosen))
    if kind in ("top", "bottom"):
        k = _count(arg, f"selection.{kind}", n)
        return Selection(kind, tuple((descending if kind == "top" else ascending)[:k]))
    if kind == "negative":
        if arg is not True:
            raise EditError('selection.negative must be true: {"negative": true}.')
        return Selection(kind, tuple(i for i in ascending if upper[i] < 0))
    if kind == "repair":
        if not isinstance(arg, Mapping) or set(arg) != {"max_neurons"}:
            raise EditError('selection.repair must be {"max_neurons": N}, the most neurons the repair may remove.')
        k = _count(arg["max_neurons"], "selection.repair.max_neurons", n)
        if not held_out:
            raise EditError(
                "selection.repair chooses how many neurons to remove by the metric on held-out data; "
                "upload it as `data` (the job's data format: inputs, labels, and groups where the metric needs them).",
                "data",
            )
        return Selection(kind, tuple(ascending[:k]), counts=tuple(range(k + 1)))
    # prune
    if not isinstance(arg, Mapping) or len(arg) != 1 or next(iter(arg)) not in ("fraction", "count"):
        raise EditError('selection.prune must be {"fraction": F} (0 < F ≤ 1) or {"count": N}.')
    if "count" in arg:
        k = _count(arg["count"], "selection.prune.count", n)
    else:
        fraction = arg["fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise EditError(f"selection.prune.fraction must be a number in (0, 1]; got {fraction!r}.")
        k = math.floor(fraction * n + 1e-9)
        if k < 1:
            raise EditError(
                f"selection.prune.fraction {fraction} of {n} neurons removes none; ask for at least {1 / n:.4g}."
            )
    step = max(1, math.ceil(k / (CURVE_POINTS - 1)))
    counts = sorted({*range(0, k, step), k})
    return Selection(kind, tuple(ascending[:k]), counts=tuple(counts), count=k)


def run_edit(
    game: NeuronGame,
    neurons: Sequence[Mapping[str, Any]],
    selection: Mapping[str, Any],
    data: EvalData,
    held_out: EvalData | None = None,
) -> dict:
    """Resolve ``selection`` and measure the edit: the shape of docs/API.md's edit, less id, state and links.

    Args:
        game: the job's game, built on ``data`` with the job's metric, layers and ablation policy.
        neurons: the job's ranked neurons, highest value first.
        selection: the selection object as submitted.
        data: the job's whole evaluation set (the game holds only the examples its metric reads; the groups'
            accuracies are over every example).
        held_out: optional examples the estimate never saw, in the job's data format.

    Returns ``{"selection", "metric", "ablation", "removed", "metrics": {"job_data", "held_out"}, "curve"}``:
    ``removed`` lists the job's records (layer, index, value, lower, upper) in removal order; each metrics entry
    is ``{"before", "after"}`` plus ``"groups": {id: {"before", "after"}}`` (accuracy) where the data has groups;
    ``curve`` (repair, prune) is ``[{"removed", "job_data", "held_out"}]``.
    """
    checked = _check_held_out(game, data, held_out) if held_out is not None else None
    plan = resolve_selection(game, neurons, selection, held_out is not None)
    n = game.n_players
    counts = list(plan.counts or ())
    masks = torch.ones(len(counts), n, dtype=torch.bool)
    for row, c in enumerate(counts):
        masks[row, list(plan.order[:c])] = False
    held_curve = _metric(game, checked, masks) if checked is not None and counts else None
    count = plan.count
    if plan.kind == "repair":
        assert held_curve is not None  # resolve_selection refuses a repair without held-out data
        count = counts[int(torch.argmax(held_curve))]  # the first best: the fewest neurons on a tie
    removed = list(plan.order if count is None else plan.order[:count])
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    ends = torch.stack([torch.ones(n, dtype=torch.bool), keep])
    job = game.full_values(torch.cat([ends, masks])).tolist()
    records = {(r["layer"], r["index"]): r for r in neurons}
    names = game.player_names()
    return {
        "selection": dict(selection),
        "metric": game.metric.spec.name,
        "ablation": game.ablation,
        "removed": [{k: records[names[i]][k] for k in _RECORD_KEYS} for i in removed],
        "metrics": {
            "job_data": _before_after(game, data, ends, job[:2]),
            "held_out": None
            if checked is None
            else _before_after(game, checked.data, ends, _metric(game, checked, ends)),
        },
        "curve": None
        if not counts
        else [
            {"removed": c, "job_data": job[2 + row], "held_out": None if held_curve is None else float(held_curve[row])}
            for row, c in enumerate(counts)
        ],
    }


def _count(value: Any, field: str, n: int) -> int:
    """A number of neurons: a whole number from 1 to the job's ``n`` players."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n:
        raise EditError(f"{field} must be a whole number from 1 to {n} (the job's neurons); got {value!r}.")
    return value


@dataclass(frozen=True)
class _Scored:
    """A data set bound to the game's metric: the metric's examples, and every example for the groups."""

    data: EvalData
    metric: Metric
    restricted: EvalData


def _check_held_out(game: NeuronGame, data: EvalData, held_out: EvalData) -> _Scored:
    if tuple(held_out.inputs.shape[1:]) != tuple(data.inputs.shape[1:]):
        raise EditError(
            f"The held-out data's inputs have shape {tuple(held_out.inputs.shape[1:])} per example, the job's data "
            f"{tuple(data.inputs.shape[1:])}; upload examples of the job's shape.",
            "data",
        )
    try:
        metric = Metric(game.metric.spec, held_out, game.n_classes, game.metric.outputs_are_probabilities)
    except UserInputError as exc:  # a label beyond the classes, or the metric's group/class missing
        raise EditError(f"The held-out data does not fit the job's metric: {exc}", "data") from exc
    return _Scored(held_out, metric, metric.restrict(held_out))


@torch.inference_mode()
def _scores(game: NeuronGame, inputs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Class scores ``[M, N, classes]`` of coalitions ``masks`` on ``inputs``, by the game's masked model."""
    masks = masks.to(game.device, torch.float32)
    outs = []
    step = max(1, _CHUNK // max(1, masks.shape[0]))
    for start in range(0, inputs.shape[0], step):
        x = inputs[start : start + step].to(game.device)
        rows = torch.arange(x.shape[0], device=game.device).repeat(masks.shape[0])
        outs.append(game.model.run(game.model.prefix(x), rows, masks).reshape(masks.shape[0], x.shape[0], -1))
    return torch.cat(outs, 1).cpu()


def _metric(game: NeuronGame, scored: _Scored, masks: torch.Tensor) -> torch.Tensor:
    """The metric of each coalition on a held-out set (``[M]``, float64)."""
    d = scored.restricted
    out = _scores(game, d.inputs, masks)
    m = masks.shape[0]
    groups = None if d.groups is None else d.groups.expand(m, -1)
    return scored.metric(out, d.labels.expand(m, -1), groups)


def _before_after(game: NeuronGame, data: EvalData, ends: torch.Tensor, values: Sequence[float] | torch.Tensor) -> dict:
    """``{"before", "after"}`` and, where ``data`` has groups, each group's accuracy before and after."""
    before, after = (float(v) for v in values)
    result: dict[str, Any] = {"before": before, "after": after}
    if data.groups is not None:
        correct = _scores(game, data.inputs, ends).argmax(-1) == data.labels
        result["groups"] = {
            str(g): {
                "before": float(correct[0, member].double().mean()),
                "after": float(correct[1, member].double().mean()),
            }
            for g in sorted(int(g) for g in torch.unique(data.groups))
            if (member := data.groups == g).any()
        }
    return result

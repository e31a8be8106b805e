"""The HTTP shapes of the jobs domain (docs/API.md): a job, its progress, a ranked neuron, a page.

The spec is :mod:`app.jobs.spec`. :class:`Neuron` and :class:`Progress` are
also what the worker publishes and stores, so they are defined once, here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from .spec import JobSpec
from .states import JobState


class Progress(BaseModel):
    """How far a job has got; live from the bus while it runs."""

    iterations: int = 0
    evaluations: int = 0
    players: int = 0
    undecided: int = 0
    v_full: float | None = None
    v_empty: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    round_evaluations: int = Field(
        0,
        description="evaluations of the round in progress, included in `evaluations`; lost if the run stops mid-round",
    )
    setup_s: float = Field(0.0, description="seconds the latest worker spent loading the model and building the game")


class JobError(BaseModel):
    type: str
    title: str
    detail: str


class JobLinks(BaseModel):
    self: str
    neurons: str
    events: str
    ablation: str
    importance: str
    edits: str
    report: str


class JobOut(BaseModel):
    id: str
    state: JobState
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: JobSpec = Field(description="the spec as submitted, with every default filled in")
    progress: Progress
    error: JobError | None
    summary: dict | None = Field(
        None,
        description="how the result was produced (stop reason, work done, estimator settings); set when the job ends",
    )
    links: JobLinks


NeuronStatus = Literal["top", "bottom", "out", "decided", "undecided"]


class Neuron(BaseModel):
    """A ranked neuron: rank 1 has the highest estimated value. The estimator library's ``ranked_neurons`` makes
    these (as dicts, with exactly these keys) and ``JobNeuron`` stores them; a test keeps the three equal."""

    rank: int
    layer: str
    index: int
    value: float
    lower: float
    upper: float
    samples: int
    status: NeuronStatus = Field(
        description="top/bottom: certified in the top/bottom k; out: certified not; "
        "decided: interval narrow enough (mode all); undecided"
    )


class RemovedNeuron(BaseModel):
    """A neuron an edit removes: the job's estimate of it, as ranked."""

    layer: str
    index: int
    value: float
    lower: float
    upper: float


class PruningPlan(BaseModel):
    """An edit's removed channels per layer, for a structured-pruning tool (``GET …/edits/{id}/pruning-plan``).

    Torch-Pruning takes one layer's list as
    ``DG.get_pruning_group(model.get_submodule(layer), tp.prune_conv_out_channels, idxs=indices).prune()``
    (``tp.prune_linear_out_channels`` for a linear layer); tests/test_pruning_handoff.py does exactly that.
    """

    layers: dict[str, list[int]] = Field(description="layer name → removed channel indices, in removal order")
    removed: list[RemovedNeuron]

    @classmethod
    def from_removed(cls, removed: list[dict]) -> PruningPlan:
        """The plan of an edit's ``removed`` records."""
        layers: dict[str, list[int]] = {}
        for record in removed:
            layers.setdefault(record["layer"], []).append(int(record["index"]))
        return cls(layers=layers, removed=[RemovedNeuron.model_validate(r) for r in removed])


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None

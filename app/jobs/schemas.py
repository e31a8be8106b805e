"""The HTTP shapes of the jobs domain (``shared/docs/API.md``).

The spec is validated here, without torch: names of metrics, modes and
bounds are repeated from the estimator library on purpose (the API process
never imports it) and a test keeps both lists equal.
"""

from __future__ import annotations

from datetime import datetime
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .states import JobState

MetricName = Literal["accuracy", "log_likelihood", "class_recall", "group_accuracy", "worst_group_accuracy", "group_gap"]
Mode = Literal["top", "bottom", "all"]
Bound = Literal["normal", "bernstein", "bernstein_observed"]
Ablation = Literal["zero", "mean"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricSpec(_Strict):
    name: MetricName
    class_: int | None = Field(None, alias="class", ge=0, description="for class_recall")
    group: int | None = Field(None, ge=0, description="for group_accuracy")
    groups: list[int] | None = Field(None, min_length=2, max_length=2, description="for group_gap: the two groups")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _needs(self) -> "MetricSpec":
        if self.name == "class_recall" and self.class_ is None:
            raise ValueError("metric class_recall needs `class`: the class whose recall to explain")
        if self.name == "group_accuracy" and self.group is None:
            raise ValueError("metric group_accuracy needs `group`: the group whose accuracy to explain")
        if self.name == "group_gap" and (self.groups is None or self.groups[0] == self.groups[1]):
            raise ValueError("metric group_gap needs `groups`: two different group ids, e.g. [0, 1]")
        return self


class PlayersSpec(_Strict):
    layers: list[str] | None = Field(None, min_length=1, description="module names or globs; default every hidden layer")
    ablation: Ablation = "zero"


class EstimatorSpec(_Strict):
    mode: Mode = "top"
    top_k: int = Field(10, ge=1)
    delta: float = Field(0.05, gt=0, lt=1)
    epsilon: float = Field(0.005, ge=0)
    half_width: float = Field(0.01, gt=0)
    bound: Bound = "normal"
    truncation: float = Field(0.1, ge=0, lt=1)
    patience: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    max_iterations: int | None = Field(None, ge=1)
    max_evaluations: int | None = Field(None, ge=1)
    max_seconds: float | None = Field(None, gt=0)


class JobSpec(_Strict):
    """What to estimate; every field is optional but ``metric.name``."""

    name: str | None = Field(None, max_length=200)
    metric: MetricSpec
    players: PlayersSpec = PlayersSpec()
    estimator: EstimatorSpec = EstimatorSpec()


class Progress(BaseModel):
    iterations: int = 0
    evaluations: int = 0
    players: int = 0
    undecided: int = 0
    v_full: float | None = None
    v_empty: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None


class JobError(BaseModel):
    type: str
    title: str
    detail: str


class JobLinks(BaseModel):
    self: str
    neurons: str
    events: str
    ablation: str


class JobOut(BaseModel):
    id: str
    state: JobState
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict
    progress: Progress
    error: JobError | None
    summary: dict | None = Field(None, description="how the result was produced (stop reason, work done, "
                                                    "estimator settings); set when the job ends")
    links: JobLinks


class Neuron(BaseModel):
    rank: int
    layer: str
    index: int
    value: float
    lower: float
    upper: float
    samples: int
    status: Literal["top", "bottom", "out", "decided", "undecided"]


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None

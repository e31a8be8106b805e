"""The HTTP shapes of edits (docs/API.md, "Acting on a result: edits"): the selection as submitted, and an edit.

A selection is one of six objects, each with one key; :func:`parse_selection`
checks its shape (the API's first check, before the job's neurons are read).
The removed neurons are :class:`app.jobs.schemas.RemovedNeuron`, the pruning
plan :class:`app.jobs.schemas.PruningPlan`; an edit's state is a
:class:`JobState` (queued, running, succeeded or failed).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from app.core.problems import Problem, field_path
from app.jobs.schemas import JobError, RemovedNeuron
from app.jobs.states import JobState

Count = Annotated[StrictInt, Field(ge=1)]  # a number of neurons


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NeuronRef(_Strict):
    layer: str
    index: StrictInt = Field(ge=0)


class RepairArgs(_Strict):
    max_neurons: Count = Field(description="the most neurons the repair may remove")


class PruneArgs(_Strict):
    fraction: StrictFloat | StrictInt | None = Field(None, gt=0, le=1, description="of the job's neurons")
    count: Count | None = None

    @model_validator(mode="after")
    def _one(self) -> PruneArgs:
        if (self.fraction is None) == (self.count is None):
            raise ValueError('give exactly one of "fraction" (0 < F ≤ 1) and "count"')
        return self


def _true(value: bool) -> bool:
    if not value:
        raise ValueError('must be true: {"negative": true}')
    return value


# Each selection's key and the shape of its value.
SELECTION_ARGS: dict[str, TypeAdapter] = {
    "neurons": TypeAdapter(list[NeuronRef]),
    "top": TypeAdapter(Count),
    "bottom": TypeAdapter(Count),
    "negative": TypeAdapter(Annotated[StrictBool, AfterValidator(_true)]),
    "repair": TypeAdapter(RepairArgs),
    "prune": TypeAdapter(PruneArgs),
}
EXAMPLES = (
    '{"top": 5}, {"bottom": 5}, {"negative": true}, {"repair": {"max_neurons": 10}}, {"prune": {"fraction": 0.2}}'
)


def parse_selection(text: str) -> tuple[str, dict]:
    """The selection's kind and the object as submitted; a 422 naming the part of it to fix otherwise."""

    def invalid(detail: str, where: str = "selection") -> Problem:
        return Problem(422, "invalid-selection", "Invalid selection", detail, field=where)

    try:
        selection = json.loads(text)
    except ValueError as exc:
        raise invalid(f"The selection is not valid JSON ({exc}); send one of {EXAMPLES}.") from exc
    if not isinstance(selection, dict) or len(selection) != 1 or next(iter(selection)) not in SELECTION_ARGS:
        raise invalid(
            f"The selection must be an object with exactly one of the keys {', '.join(SELECTION_ARGS)}, "
            f"e.g. {EXAMPLES}; got {text[:200]!r}."
        )
    ((kind, arg),) = selection.items()
    try:
        SELECTION_ARGS[kind].validate_python(arg)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(p for p in (f"selection.{kind}", field_path(tuple(error.get("loc", ())))) if p != "request")
        raise invalid(f"{where}: {error['msg'].removeprefix('Value error, ')}; e.g. {EXAMPLES}.", where) from exc
    if kind == "neurons" and not arg:
        raise invalid('selection.neurons must list at least one {"layer": …, "index": …}.', "selection.neurons")
    return kind, selection


class GroupFigures(BaseModel):
    before: float
    after: float


class Figures(BaseModel):
    """The metric before and after the edit on one data set; ``groups``: each group's accuracy, where it has groups."""

    before: float
    after: float
    groups: dict[str, GroupFigures] | None = None


class EditMetrics(BaseModel):
    job_data: Figures
    held_out: Figures | None = Field(description="the same on the uploaded held-out data; null without it")


class CurvePoint(BaseModel):
    removed: int
    job_data: float
    held_out: float | None


class EditError(JobError):
    field: str | None = Field(None, description="the part of the edit to fix: `selection` or `data`")


class EditLinks(BaseModel):
    self: str
    job: str
    model: str
    pruning_plan: str


class EditOut(BaseModel):
    id: str
    job_id: str
    state: JobState = Field(description="queued | running | succeeded | failed")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    selection: dict = Field(description="as submitted")
    metric: str | None = Field(None, description="the job's metric, which `metrics` measures")
    ablation: str | None = Field(None, description="the job's ablation policy: how the neurons were removed")
    removed: list[RemovedNeuron] | None = Field(description="in removal order; null until the edit has run")
    metrics: EditMetrics | None
    curve: list[CurvePoint] | None = Field(description="repair and prune: the metric after each count removed")
    error: EditError | None
    links: EditLinks

"""The job spec: what a user asks to estimate. One definition, torch-free, for the API, the worker and the CLI.

The API validates a submitted spec with :class:`JobSpec` and stores it with
every default filled in; the worker turns the stored spec into the
estimator's game and settings with ``worker.translate`` (the one translator);
``neuronshap estimate`` builds the same :class:`JobSpec` from its options, so
a bad option is refused before torch loads.

The names of metrics, modes, bounds and ablations are the estimator
library's; the library is pure PyTorch and cannot import this module (nor
this one the library, which would load torch into the API), so
``tests/test_job_schemas.py`` keeps the two lists equal.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

MetricName = Literal[
    "accuracy", "log_likelihood", "class_recall", "group_accuracy", "worst_group_accuracy", "group_gap"
]
Mode = Literal["top", "bottom", "all"]
Bound = Literal["normal", "bernstein", "bernstein_observed"]
Ablation = Literal["zero", "mean"]

METRICS: tuple[str, ...] = get_args(MetricName)
MODES: tuple[str, ...] = get_args(Mode)
BOUNDS: tuple[str, ...] = get_args(Bound)
ABLATIONS: tuple[str, ...] = get_args(Ablation)

DEFAULT_TOP_K = 10


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricSpec(_Strict):
    """The metric whose Shapley values to estimate; every metric is "higher is better"."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: MetricName = Field(
        description="accuracy; log_likelihood (mean log-probability of the true class); "
        "class_recall (needs `class`); group_accuracy (needs `group`); "
        "worst_group_accuracy; group_gap (needs `groups`: minus the absolute "
        "accuracy gap between two groups, so a negative value widens the gap)"
    )
    class_: int | None = Field(None, alias="class", ge=0, description="for class_recall: the class whose recall")
    group: int | None = Field(None, ge=0, description="for group_accuracy: the group whose accuracy")
    groups: list[int] | None = Field(
        None, min_length=2, max_length=2, description="for group_gap: the two groups whose accuracy gap"
    )

    @model_validator(mode="after")
    def _needs(self) -> MetricSpec:
        if self.name == "class_recall" and self.class_ is None:
            raise ValueError("metric class_recall needs `class`: the class whose recall to explain")
        if self.name == "group_accuracy" and self.group is None:
            raise ValueError("metric group_accuracy needs `group`: the group whose accuracy to explain")
        if self.name == "group_gap" and (self.groups is None or self.groups[0] == self.groups[1]):
            raise ValueError("metric group_gap needs `groups`: two different group ids, e.g. [0, 1]")
        return self


class PlayersSpec(_Strict):
    """Which neurons play, and what a removed one outputs."""

    layers: list[str] | None = Field(
        None,
        min_length=1,
        description="layer names or globs (`conv2`, `layer1.*`); default every conv "
        "and linear layer but the one producing the output",
    )
    ablation: Ablation = Field(
        "zero",
        description="a removed neuron outputs 0 (`zero`) or its mean activation over the evaluation set (`mean`)",
    )


class EstimatorSpec(_Strict):
    """TMAB-Shapley's settings (docs/ESTIMATOR.md); the defaults are what the benchmarks led to."""

    mode: Mode = Field(
        "top",
        description="`top`: find the top_k most helpful neurons; `bottom`: the top_k most "
        "harmful; `all`: every value to half_width",
    )
    top_k: int | None = Field(
        None,
        ge=1,
        description=f"how many neurons top/bottom separate from the rest; default "
        f"{DEFAULT_TOP_K}, or one less than the number of neurons "
        "when the layers have no more",
    )
    delta: float = Field(
        0.05, gt=0, lt=1, description="error level of all intervals together (union bound), at every round"
    )
    epsilon: float = Field(
        0.005,
        ge=0,
        description="tolerance of the certified top-k: at a converged stop every chosen neuron is within epsilon "
        "of the true k-th value",
    )
    half_width: float = Field(0.01, gt=0, description="target interval half-width for mode `all`")
    bound: Bound = Field(
        "normal",
        description="the confidence sequence: `normal` (normal mixture), `bernstein` "
        "(rigorous, known range), `bernstein_observed` (observed range)",
    )
    truncation: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="stop a walk once the value stays within this fraction "
        "of |V(all) − V(∅)| of V(∅); 0: no truncation",
    )
    patience: int = Field(5, ge=1, description="evaluated steps within the truncation band before a walk stops")
    batch_size: int = Field(16, ge=1, description="evaluation examples per walk")
    seed: int = Field(0, description="the whole run is a function of it")
    max_iterations: int | None = Field(None, ge=1, description="budget: permutations walked and star coalitions")
    max_evaluations: int | None = Field(None, ge=1, description="budget: coalition evaluations")
    max_seconds: float | None = Field(None, gt=0, description="budget: seconds of estimation")


class JobSpec(_Strict):
    """What to estimate; every field is optional but ``metric.name``."""

    name: str | None = Field(None, max_length=200, description="a label for people; not used by the estimator")
    metric: MetricSpec
    players: PlayersSpec = PlayersSpec()
    estimator: EstimatorSpec = EstimatorSpec()

"""What a coalition of neurons is worth: metrics on the model's class scores.

Every metric is "higher is better", so a positive Shapley value means the
neuron helps. The fairness metric is therefore the *negative* gap between two
groups' accuracies: a neuron with a negative value widens the gap, and
zeroing it narrows it.

A metric sees the outputs of M coalitions at once (``[M, B, classes]``) and
returns M values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import EvalData
from .errors import SpecError

__all__ = ["METRICS", "MetricSpec", "Metric"]

METRICS = ("accuracy", "log_likelihood", "class_recall", "group_accuracy", "worst_group_accuracy", "group_gap")


@dataclass(frozen=True)
class MetricSpec:
    """The metric as the user states it (docs/API.md's ``metric`` object)."""

    name: str
    class_: int | None = None
    group: int | None = None
    groups: tuple[int, int] | None = None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "class": self.class_,
            "group": self.group,
            "groups": None if self.groups is None else list(self.groups),
        }


class Metric:
    """A validated metric bound to one evaluation set's classes and groups."""

    def __init__(self, spec: MetricSpec, data: EvalData, n_classes: int, outputs_are_probabilities: bool) -> None:
        if spec.name not in METRICS:
            raise SpecError(f"Unknown metric {spec.name!r}; choose one of {', '.join(METRICS)}.")
        self.spec = spec
        self.outputs_are_probabilities = outputs_are_probabilities
        labels_max = int(data.labels.max())
        if labels_max >= n_classes:
            raise SpecError(
                f"The data has label {labels_max} but the model outputs only {n_classes} classes (0..{n_classes - 1}); "
                "check that the labels and the model belong together."
            )
        self._check_fields(data, n_classes)

    @property
    def value_range(self) -> float | None:
        """Width of the interval the metric lives in; None when unbounded."""
        return None if self.spec.name == "log_likelihood" else 1.0

    def restrict(self, data: EvalData) -> EvalData:
        """Only the examples that can move the metric (one class, one group, the two compared groups).

        ``data`` is the set the metric was bound to: :meth:`_check_fields` has made sure it has the groups,
        and the spec the fields, that the metric reads.
        """
        s = self.spec
        if s.name == "class_recall":
            assert s.class_ is not None
            return data.subset(data.labels == s.class_)
        if s.name == "group_accuracy":
            assert data.groups is not None and s.group is not None
            return data.subset(data.groups == s.group)
        if s.name == "group_gap":
            assert data.groups is not None and s.groups is not None
            return data.subset((data.groups == s.groups[0]) | (data.groups == s.groups[1]))
        return data

    def strata(self, data: EvalData) -> torch.Tensor | None:
        """Group ids that every evaluation batch must represent, so group metrics stay defined."""
        return data.groups if self.spec.name in ("worst_group_accuracy", "group_gap") else None

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        """Values ``[M]`` (float64) for outputs ``[M, B, classes]`` and labels/groups ``[M, B]``."""
        name = self.spec.name
        if name == "log_likelihood":
            scores = outputs.double()
            logp = scores.clamp_min(1e-300).log() if self.outputs_are_probabilities else scores.log_softmax(-1)
            return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean(1)
        correct = (outputs.argmax(-1) == labels).double()
        if name in ("accuracy", "class_recall", "group_accuracy"):
            return correct.mean(1)
        # The group metrics: the game passes each batch's groups, and group_gap's spec names two (_check_fields).
        assert groups is not None
        ids: Sequence[int]
        if name == "worst_group_accuracy":
            ids = sorted(int(g) for g in torch.unique(groups))
        else:
            assert self.spec.groups is not None
            ids = self.spec.groups
        per_group = []
        for g in ids:
            member = (groups == g).double()
            per_group.append((correct * member).sum(1) / member.sum(1).clamp_min(1.0))
        stacked = torch.stack(per_group, 1)
        if name == "worst_group_accuracy":
            return stacked.min(1).values
        return -(stacked[:, 0] - stacked[:, 1]).abs()

    def _check_fields(self, data: EvalData, n_classes: int) -> None:
        s = self.spec
        if s.name == "class_recall":
            if s.class_ is None:
                raise SpecError("Metric class_recall needs `class`: the class whose recall to explain.")
            if not 0 <= s.class_ < n_classes:
                raise SpecError(f"`class` {s.class_} is not a class of the model (0..{n_classes - 1}).")
            if not bool((data.labels == s.class_).any()):
                raise SpecError(f"The data has no example of class {s.class_}, so its recall is undefined; add some.")
        if s.name in ("group_accuracy", "worst_group_accuracy", "group_gap") and data.groups is None:
            raise SpecError(
                f"Metric {s.name} needs a `groups` array in the data file (one int64 group id per example)."
            )
        present = set() if data.groups is None else {int(g) for g in torch.unique(data.groups)}
        if s.name == "group_accuracy":
            if s.group is None:
                raise SpecError("Metric group_accuracy needs `group`: the group whose accuracy to explain.")
            if s.group not in present:
                raise SpecError(f"No example is in group {s.group}; the data's groups are {sorted(present)}.")
        if s.name == "worst_group_accuracy" and len(present) < 2:
            raise SpecError(f"worst_group_accuracy needs at least two groups; the data has {sorted(present)}.")
        if s.name == "group_gap":
            if s.groups is None or len(s.groups) != 2 or s.groups[0] == s.groups[1]:
                raise SpecError("Metric group_gap needs `groups`: two different group ids to compare, e.g. [0, 1].")
            absent = [g for g in s.groups if g not in present]
            if absent:
                raise SpecError(f"No example is in group(s) {absent}; the data's groups are {sorted(present)}.")

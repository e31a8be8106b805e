"""The API's spec validation (torch-free) agrees with the estimator library."""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest
from pydantic import ValidationError

from app.jobs.schemas import Ablation, Bound, EstimatorSpec, JobSpec, MetricName, Mode
from worker.shapley import ABLATIONS, METRICS, MODES, TMABConfig
from worker.shapley.bounds import BOUNDS


def test_names_match_the_library():
    assert set(get_args(MetricName)) == set(METRICS)
    assert set(get_args(Mode)) == set(MODES)
    assert set(get_args(Bound)) == set(BOUNDS)
    assert set(get_args(Ablation)) == set(ABLATIONS)


def test_estimator_defaults_match_the_library():
    library = {f.name: f.default for f in dataclasses.fields(TMABConfig)}
    for name, value in EstimatorSpec().model_dump().items():
        if name != "batch_size":
            assert library[name] == value, name


def test_a_minimal_spec_gets_every_default():
    spec = JobSpec.model_validate({"metric": {"name": "class_recall", "class": 3}})
    dumped = spec.model_dump(by_alias=True)
    assert dumped["metric"]["class"] == 3
    assert dumped["players"] == {"layers": None, "ablation": "zero"}
    assert dumped["estimator"]["mode"] == "top" and dumped["estimator"]["top_k"] == 10


@pytest.mark.parametrize(
    "spec, where",
    [
        ({"metric": {"name": "f1"}}, ("metric", "name")),
        ({"metric": {"name": "accuracy"}, "estimator": {"top_k": 0}}, ("estimator", "top_k")),
        ({"metric": {"name": "accuracy"}, "estimator": {"max_seconds": 0}}, ("estimator", "max_seconds")),
        ({"metric": {"name": "accuracy"}, "estimator": {"topk": 5}}, ("estimator", "topk")),
        ({"metric": {"name": "group_gap", "groups": [1, 1]}}, ("metric",)),
        ({}, ("metric",)),
    ],
)
def test_specs_that_make_no_sense_name_the_field(spec, where):
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec)
    assert info.value.errors()[0]["loc"][: len(where)] == where

"""The job spec (torch-free) agrees with the estimator library, and the one translator between them."""

from __future__ import annotations

import dataclasses
import inspect
from typing import get_args

import pytest
import torch
from pydantic import ValidationError

from app.jobs.models import JobNeuron
from app.jobs.schemas import Neuron
from app.jobs.spec import Ablation, Bound, EstimatorSpec, JobSpec, MetricName, Mode
from worker.shapley import ABLATIONS, METRICS, MODES, NeuronGame, SpecError, TMABConfig, ranked_neurons, run_tmab
from worker.shapley.bounds import BOUNDS
from worker.translate import tmab_config


def test_names_match_the_library():
    assert set(get_args(MetricName)) == set(METRICS)
    assert set(get_args(Mode)) == set(MODES)
    assert set(get_args(Bound)) == set(BOUNDS)
    assert set(get_args(Ablation)) == set(ABLATIONS)


def test_estimator_defaults_match_the_library():
    library = {f.name: f.default for f in dataclasses.fields(TMABConfig)}
    for name, value in EstimatorSpec().model_dump().items():
        if name not in ("batch_size", "top_k"):  # batch_size is the game's, top_k the spec's: both below
            assert library[name] == value, name
    assert EstimatorSpec().batch_size == inspect.signature(NeuronGame).parameters["batch_size"].default
    # An unset top_k is the library's default wherever the game is large enough for it.
    assert tmab_config(EstimatorSpec(), 1000) == TMABConfig()


def test_an_unset_top_k_fits_a_small_game_and_a_set_one_is_checked_against_it():
    assert tmab_config(EstimatorSpec(), 4).top_k == 3
    assert tmab_config(EstimatorSpec(top_k=2), 4).top_k == 2
    with pytest.raises(SpecError, match="top_k must be between 1 and 3"):
        tmab_config(EstimatorSpec(top_k=4), 4)
    assert tmab_config(EstimatorSpec(mode="all"), 1).mode == "all"
    with pytest.raises(SpecError, match="at least two"):
        tmab_config(EstimatorSpec(), 1)


def test_every_spec_field_is_described_in_the_openapi_schema():
    for model in (JobSpec, EstimatorSpec):
        for name, info in model.model_fields.items():
            assert info.description or name in ("metric", "players", "estimator"), (model.__name__, name)


def test_a_minimal_spec_gets_every_default():
    spec = JobSpec.model_validate({"metric": {"name": "class_recall", "class": 3}})
    dumped = spec.model_dump(by_alias=True)
    assert dumped["metric"]["class"] == 3
    assert dumped["players"] == {"layers": None, "ablation": "zero"}
    assert dumped["estimator"]["mode"] == "top"
    assert dumped["estimator"]["top_k"] is None  # 10, or fewer for a smaller game: resolved when the game exists


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


def test_a_ranked_neuron_has_one_shape_in_the_library_the_api_and_the_table():
    """The library's ``ranked_neurons`` makes them, the API's ``Neuron`` shows them, ``JobNeuron`` stores them."""

    class TwoPlayers:
        n_players, value_range, max_coalitions_per_pass, rows_per_coalition = 2, 1.0, 8, 1

        def sample(self, generator, lanes):
            return None

        def evaluate(self, sample, masks, lanes):
            return masks.double() @ torch.tensor([0.3, 0.1], dtype=torch.float64)

        def player_names(self):
            return [("fc", 0), ("fc", 1)]

    game = TwoPlayers()
    neurons = ranked_neurons(game, run_tmab(game, TMABConfig(top_k=1, max_iterations=4)))
    assert [list(n) for n in neurons] == [list(Neuron.model_fields)] * 2
    assert [Neuron.model_validate(n).layer for n in neurons] == ["fc", "fc"]
    stored = [c.name for c in JobNeuron.__table__.columns if c.name != "job_id"]
    assert sorted(stored) == sorted(Neuron.model_fields)

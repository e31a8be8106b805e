"""Neuron Shapley: which neurons of a trained network carry a metric.

A pure PyTorch library (no web, queue or database code): load a model and an
evaluation set, make a :class:`NeuronGame`, and run :func:`run_tmab`.

    game = NeuronGame(load_model("cnn.onnx"), load_data("eval.npz"), MetricSpec("accuracy"))
    estimate = run_tmab(game, TMABConfig(mode="top", top_k=10))
    ranked_neurons(game, estimate)[:10]
"""

from .ablation import ablation_curve, relative_weight_norms, weight_norms
from .data import EvalData, load_data
from .editing import EditError, run_edit
from .errors import DataError, ModelError, SpecError, UserInputError
from .exact import exact_shapley
from .game import ABLATIONS, NeuronGame
from .loading import load_model
from .metrics import METRICS, MetricSpec
from .report import ranked_neurons, run_summary
from .tmab import MODES, Estimate, Progress, TMABConfig, run_tmab

__all__ = [
    "ABLATIONS",
    "METRICS",
    "MODES",
    "DataError",
    "EditError",
    "Estimate",
    "EvalData",
    "MetricSpec",
    "ModelError",
    "NeuronGame",
    "Progress",
    "SpecError",
    "TMABConfig",
    "UserInputError",
    "exact_shapley",
    "load_data",
    "load_model",
    "ranked_neurons",
    "run_summary",
    "run_tmab",
    "run_edit",
    "ablation_curve",
    "relative_weight_norms",
    "weight_norms",
]

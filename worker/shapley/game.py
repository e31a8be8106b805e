"""A trained model on an evaluation set, seen as a cooperative game of its neurons.

:class:`NeuronGame` is what the estimator plays: it draws evaluation batches,
runs the prefix of the model once per batch, and returns the metric of many
coalitions per forward pass. It owns every tensor it touches, on one device,
so the estimator's loop never moves data between host and device except the
M metric values it reads back per pass.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.fx

from .data import EvalData
from .errors import ModelError, SpecError
from .grouped import grouped_suffix
from .masking import BuildTimeout, MaskedModel, Probes, build_masked_model, deadline_check, probe_batches, site_means
from .metrics import Metric, MetricSpec
from .onnx_import import TEMPORARIES
from .players import Layer, find_layers, select_layers

__all__ = ["NeuronGame", "Sample", "ABLATIONS", "BuildTimeout"]

ABLATIONS = ("zero", "mean")
_CHUNK = 512  # examples per forward pass when a whole set is run (full values)
# Examples per run of the mean-fill pass: small enough that one node of it ends soon after a build's deadline.
_CHUNK_MEANS = 64


@dataclass
class Sample:
    """Evaluation batches of one round: ``lane_rows[l]`` are the frontier rows of lane ``l``'s batch."""

    frontier: tuple[torch.Tensor, ...]
    lane_rows: torch.Tensor  # [lanes, B] on the device
    labels: torch.Tensor  # [lanes, B]
    groups: torch.Tensor | None  # [lanes, B]


class NeuronGame:
    """The neurons of ``layers`` (names or globs; default every hidden conv/linear layer) as players.

    Args:
        model: graph from :func:`worker.shapley.loading.load_model`.
        data: evaluation set.
        metric: what a coalition is worth.
        layers: layer names or globs; ``None`` for every layer but the output layer.
        ablation: ``"zero"`` or ``"mean"`` (the channel's mean activation on the intact model).
        batch_size: examples per evaluation batch; the whole set when it is smaller. The default is small on
            purpose: a marginal's variance comes mostly from the permutation, not from the batch, so smaller
            batches buy more samples per second (``bench/results/batch_size.txt``; 16 rather than 32 since the
            certificate got honest and needs more samples, ``bench/results/certificate.txt``).
        device: where to run; the GPU when there is one.
        cache_prefix: run the part of the model before the first mask once per batch.
        memory_bytes: activation memory one forward pass may use; bounds coalitions per pass.
        grouped: compute a pass's coalitions once per group that shares the masks of every layer so far
            (:mod:`worker.shapley.grouped`), where the model passes the check that this changes no output;
            a quarter of ``memory_bytes`` bounds one layer's per-neuron contributions there.
        deadline: a ``time.monotonic()`` time by which the build must be done (the run's budget counts from its
            start): its runs stop between two nodes past it, raising :class:`BuildTimeout`.
    """

    def __init__(
        self,
        model: torch.fx.GraphModule,
        data: EvalData,
        metric: MetricSpec,
        layers: list[str] | None = None,
        ablation: str = "zero",
        batch_size: int = 16,
        device: str | torch.device | None = None,
        cache_prefix: bool = True,
        memory_bytes: int | None = None,
        grouped: bool = True,
        deadline: float | None = None,
    ) -> None:
        if ablation not in ABLATIONS:
            raise SpecError(f"Unknown ablation {ablation!r}; choose 'zero' or 'mean'.")
        if batch_size < 1:
            raise SpecError(f"batch_size must be at least 1, not {batch_size}.")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.ablation = ablation
        self.layers: list[Layer] = select_layers(find_layers(model), layers)
        check = deadline_check(deadline)

        # A few examples for every load-time check, each run once (probes) and shared: see probe_batches.
        example = data.inputs[:3]
        started = time.monotonic()
        probes = probe_batches(model, example, check)
        # What one example's forward pass costs, from the probes' 2 + 3 examples (node by node, so an upper bound):
        # the estimator's first pass under a deadline is sized by it rather than by a probe that may itself
        # overrun (8 coalitions of 64 examples of ResNet-50 at 224 px took minutes on a CPU). Measured on the
        # CPU, so only a CPU game has it.
        self.seconds_per_row: float | None = (time.monotonic() - started) / 5 if self.device.type == "cpu" else None
        scores = _class_scores(probes.out3)
        self.n_classes = int(scores.shape[1])
        probabilities = bool((scores >= 0).all() and torch.allclose(scores.sum(1), torch.ones(len(scores)), atol=1e-4))
        self.metric = Metric(metric, data, self.n_classes, probabilities)

        self.data = self.metric.restrict(data)
        self.batch_size = min(batch_size, len(self.data))
        # The budget of one pass: the coalitions' activations, and (grouped) a quarter for a linear layer's
        # per-neuron contributions (grouped.py), which a pass may hold besides.
        budget = memory_bytes or default_memory_bytes(self.device)
        activations = budget - budget // 4 if grouped else budget
        self.bytes_per_row = _bytes_per_row(model, probes)
        needed = self.bytes_per_row * self.batch_size
        if needed > activations:
            raise ModelError(
                f"One coalition of this model on a batch of {self.batch_size} examples needs about "
                f"{-(-needed // (1 << 20))} MiB of activation memory"
                f"{' (plus a quarter of the budget for grouped evaluation)' if grouped else ''}, more than the "
                f"{budget >> 20} MiB budget allows. Raise NEURONSHAP_ACTIVATION_MEMORY_MB (neuronshap estimate "
                f"--activation-memory-mb) to at least {-(-budget_for(needed, grouped) // (1 << 20))}, "
                "or lower estimator.batch_size (--batch-size)."
            )
        self.max_coalitions_per_pass = activations // needed
        fills = (
            site_means(
                model, self.layers, data.inputs, max(1, min(_CHUNK_MEANS, activations // self.bytes_per_row)), check
            )
            if ablation == "mean"
            else None
        )
        # What loading did to the model file (an opset upgrade, a batch freed, class scores flattened): results say so.
        self.loaded_as = {k: v for k, v in model.meta.items() if k.startswith("onnx_") or k == "output_flattened"}
        self.model: MaskedModel = build_masked_model(model, self.layers, example, fills, cache_prefix, probes, check)
        self._grouped = grouped_suffix(self.model, example, budget // 4, check) if grouped else None
        self.model.to(self.device)
        self._inputs = self.data.inputs.to(self.device)
        self._labels = self.data.labels.to(self.device)
        self._groups = None if self.data.groups is None else self.data.groups.to(self.device)
        self._strata = self.metric.strata(self.data)
        self._whole: Sample | None = None

    @property
    def n_players(self) -> int:
        return self.model.n_players

    @property
    def value_range(self) -> float | None:
        return self.metric.value_range

    @property
    def rows_per_coalition(self) -> int:
        return self.batch_size

    def player_names(self) -> list[tuple[str, int]]:
        """(layer, channel index) of every player, in player order."""
        return [(layer.name, i) for layer in self.layers for i in range(layer.size)]

    def describe(self) -> dict:
        """What a result needs to say about the game that produced it."""
        return {
            "metric": self.metric.spec.describe(),
            "ablation": self.ablation,
            "removal_point": "after the BatchNorm/activation chain that only the neuron feeds",
            "layers": [{"name": layer.name, "kind": layer.kind, "neurons": layer.size} for layer in self.layers],
            "examples": len(self.data),
            "batch_size": self.batch_size,
            "outputs_are_probabilities": self.metric.outputs_are_probabilities,
            "grouped_evaluation": self._grouped is not None,
            "deferred_gates": self._grouped is not None and self._grouped.defer,
            "model": self.loaded_as,
        }

    @torch.inference_mode()
    def sample(self, generator: torch.Generator, lanes: int) -> Sample:
        """Draw one evaluation batch per lane (without replacement) and run their prefix."""
        n, b = len(self.data), self.batch_size
        if b == n:  # every batch is the whole set: its prefix is computed once per run
            if self._whole is None:
                self._whole = self._prepare(torch.arange(n).unsqueeze(0))
            rows = self._whole.lane_rows.expand(lanes, b)
            return Sample(
                self._whole.frontier, rows, self._labels[rows], None if self._groups is None else self._groups[rows]
            )
        picks = torch.stack([self._draw(generator) for _ in range(lanes)])
        return self._prepare(picks)

    @torch.inference_mode()
    def evaluate(self, sample: Sample, masks: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
        """Metric values (float64, CPU) of coalitions ``masks`` (``[M, n]`` bool) on their lanes' batches."""
        lanes = lanes.to(self.device)
        masks = masks.to(self.device, self._inputs.dtype)
        if self._grouped is not None:
            out = self._grouped.evaluate(sample.frontier, sample.lane_rows, lanes, masks)
        else:
            out = self.model.run(sample.frontier, sample.lane_rows[lanes].reshape(-1), masks)
        out = out.reshape(masks.shape[0], self.batch_size, -1)
        groups = None if sample.groups is None else sample.groups[lanes]
        return self.metric(out, sample.labels[lanes], groups).cpu()

    @torch.inference_mode()
    def full_values(self, masks: torch.Tensor) -> torch.Tensor:
        """Metric of coalitions ``masks`` on the whole (restricted) evaluation set, for checks and ablations."""
        masks = masks.to(self.device, self._inputs.dtype)
        outs = []
        step = max(1, _CHUNK // max(1, masks.shape[0]))
        for start in range(0, len(self.data), step):
            x = self._inputs[start : start + step]
            rows = torch.arange(x.shape[0], device=self.device).repeat(masks.shape[0])
            outs.append(self.model.run(self.model.prefix(x), rows, masks).reshape(masks.shape[0], x.shape[0], -1))
        out = torch.cat(outs, 1)
        labels = self._labels.expand(masks.shape[0], -1)
        groups = None if self._groups is None else self._groups.expand(masks.shape[0], -1)
        return self.metric(out, labels, groups).cpu()

    def _prepare(self, picks: torch.Tensor) -> Sample:
        lanes, b = picks.shape
        flat = picks.reshape(-1).to(self.device)
        frontier = self.model.prefix(self._inputs[flat])
        rows = torch.arange(lanes * b, device=self.device).reshape(lanes, b)
        return Sample(
            frontier,
            rows,
            self._labels[flat].reshape(lanes, b),
            None if self._groups is None else self._groups[flat].reshape(lanes, b),
        )

    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        """One batch; with strata (group metrics) every group gets its share, at least one example."""
        n, b = len(self.data), self.batch_size
        if self._strata is None:
            return torch.randperm(n, generator=generator)[:b]
        ids = torch.unique(self._strata)
        members = [torch.nonzero(self._strata == g).squeeze(1) for g in ids]
        sizes = torch.tensor([len(m) for m in members], dtype=torch.float64)
        counts = torch.clamp((sizes * b / n).floor().long(), min=1)
        while counts.sum() < b:  # give the remainder to the groups furthest below their share
            short = sizes * b / n - counts
            short[counts >= sizes.long()] = -float("inf")
            counts[int(short.argmax())] += 1
        while counts.sum() > b:
            counts[int(counts.argmax())] -= 1
        return torch.cat(
            [m[torch.randperm(len(m), generator=generator)[:c]] for m, c in zip(members, counts, strict=True)]
        )


def _class_scores(out: object) -> torch.Tensor:
    """The model's output on the probe's examples, checked to be finite class scores ``[batch, classes]``."""
    while isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"The model's output has shape {shape}; the metrics need class scores of shape [batch, classes] "
            "(logits, log-probabilities or probabilities) with at least two classes."
        )
    if not torch.isfinite(out).all():
        raise ModelError(
            "The model outputs NaN or infinite scores on the evaluation data; check the model and the inputs' scaling."
        )
    return out


def default_memory_bytes(device: torch.device) -> int:
    """A pass's activation budget when none is set: half the memory of the device that runs it (the rest for
    the model, the data, the prefix cache and the process beside it), at least 1 GiB. On a 24 GB machine, VGG-19
    at 224x224 fits one coalition of 64 examples; on a GPU, a fixed 8 GiB let ResNet-50 at 224 px fit about 3
    coalitions a pass on a 139 GiB device (bench/bench_scale.py)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    elif device.type == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:  # a device whose memory torch does not report
        return 8 << 30
    return max(1 << 30, total // 2)


def budget_for(needed: int, grouped: bool) -> int:
    """The least budget under which one coalition needing ``needed`` bytes of activations fits."""
    return -(-needed * 4 // 3) if grouped else needed


def _bytes_per_row(model: torch.fx.GraphModule, probes: Probes) -> int:
    """Peak activation memory of one example of a pass (float32): the most per-example tensors that are alive at
    once when the graph runs in order (each from the node that makes it to its last user: a residual branch or
    DenseNet's concatenations keep several), plus the largest once more for the copy a gate makes of a layer's
    output, times 2.5 for what that count leaves out (the grouped engine's copies where groups refine, at a
    residual Add; the frontier's copy; kernel workspaces; the allocator's slack), with the temporaries of the
    nodes that make several (onnx_import.TEMPORARIES: LRN). Measured per row, peak RSS of
    passes at 224x224 (bench/bench_zoo.py): VGG-19 39-43 MiB against a count of 37, ResNet-50 31 MiB against
    12; the estimate before (the three largest tensors, 4x) said 147 MiB for VGG-19 and 1-4 coalitions fitted."""
    shapes, threes = probes.two.shapes, probes.three.shapes
    size: dict[torch.fx.Node, int] = {}
    for node in model.graph.nodes:
        two, three = shapes.get(node), threes.get(node)
        if two is not None and three is not None and len(two) > 0 and two[0] == 2 and three[0] == 3:
            size[node] = two.numel() // 2 * 4
    last_use: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in model.graph.nodes:
        for arg in node.all_input_nodes:
            last_use[arg] = node
    dying: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for value, user in last_use.items():
        dying.setdefault(user, []).append(value)
    live = peak = 0
    for node in model.graph.nodes:
        live += size.get(node, 0)
        peak = max(peak, live + TEMPORARIES.get(node.target, 0) * size.get(node, 0))
        live -= sum(size.get(value, 0) for value in dying.get(node, ()))
        if node not in last_use:
            live -= size.get(node, 0)
    return max(1, (peak + max(size.values(), default=0)) * 5 // 2)

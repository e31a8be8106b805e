"""Prototype (evidence for a proposed library change): evaluate coalitions *grouped* by their upstream masks.

Run from the repository root::

    python -m bench.proto_grouped_suffix [--quick]

Why. A pass of the estimator holds runs of consecutive coalitions of one
permutation walk. Two coalitions that keep the same neurons in every layer
*before* a given layer have identical activations up to that layer, yet the
library's suffix repeats the whole batch once per coalition and recomputes
everything. In a chunk of 16 consecutive steps of a walk over the wide CNN
(16 conv1 + 1,024 conv2 neurons), the conv1 masks take only ~1-2 distinct
values, so the conv2 convolution (98% of the FLOPs) need only run 1-2 times
instead of 16.

How. :class:`GroupedSuffix` runs the game's suffix graph node by node. Every
per-example value is held as ``(tensor of G groups x B rows, key)``, where
``key[m]`` says which group coalition ``m`` uses. At each gate, groups split
by the layer's mask (``torch.unique`` over (old group, mask slice)); an op
whose tensor inputs have different keys first expands them to their common
refinement. Sizes read from a tensor (``sym_size``) are carried as a marker
and replaced by the actual first dimension where a reshape uses them. The
final output is expanded to one row block per coalition for the metric.

:class:`GroupedGame` is a :class:`NeuronGame` whose ``evaluate`` uses it, so
``run_tmab`` measures it exactly like the library's own evaluation. The
script checks that both give identical values and prints evaluations/s for
the same runs as section (b) of ``bench_estimator``.
"""

from __future__ import annotations

import argparse
import operator
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.fx

from worker.shapley import MetricSpec, NeuronGame, TMABConfig, run_tmab
from worker.shapley.masking import Gate

OFF = 10**9


class _Batch:
    """Marker for "the first dimension of the tensor this shape is applied to"."""


_BATCH = _Batch()


class _G:
    """A per-example value held once per group: ``t`` is ``[G*B, ...]``, ``key[m]`` is coalition m's group."""

    __slots__ = ("t", "key", "groups")

    def __init__(self, t: torch.Tensor, key: torch.Tensor, groups: int) -> None:
        self.t, self.key, self.groups = t, key, groups

    def expand(self, key: torch.Tensor, reps: torch.Tensor, b: int) -> torch.Tensor:
        """Rows for the groups of ``key`` (``reps[g]`` is a coalition of new group g)."""
        old = self.key[reps]
        if self.groups == len(reps) and torch.equal(old, torch.arange(len(reps))):
            return self.t
        t = self.t.reshape(self.groups, b, *self.t.shape[1:])[old]
        return t.reshape(len(reps) * b, *self.t.shape[1:])


def _refine(keys: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Common refinement of several group keys: (new key [M], one representative coalition per new group)."""
    stacked = torch.stack(keys, 1)
    uniq, key = torch.unique(stacked, dim=0, return_inverse=True)
    reps = torch.empty(len(uniq), dtype=torch.long)
    reps.scatter_(0, key, torch.arange(len(key)))
    return key, reps


class GroupedSuffix(torch.fx.Interpreter):
    def __init__(self, suffix: torch.fx.GraphModule) -> None:
        super().__init__(suffix)
        self.placeholders = [n for n in suffix.graph.nodes if n.op == "placeholder"]

    def evaluate(self, frontier, lane_rows: torch.Tensor, lanes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        self.b = lane_rows.shape[1]
        self.masks = masks
        uniq, key = torch.unique(lanes, return_inverse=True)
        self.lane_rows = lane_rows[uniq].reshape(-1)
        self.lane_key, self.lane_groups = key, len(uniq)
        result = self.run(*frontier, None, masks)
        return result.expand(torch.arange(masks.shape[0]), torch.arange(masks.shape[0]), self.b)

    def run_node(self, n: torch.fx.Node):
        if n.op == "call_function" and n.target is torch.index_select:
            src = self.env[n.args[0]]
            return _G(torch.index_select(src, 0, self.lane_rows), self.lane_key, self.lane_groups)
        if n.op == "call_module" and isinstance(self.module.get_submodule(n.target), Gate):
            gate = self.module.get_submodule(n.target)
            x: _G = self.env[n.args[0]]
            m = self.masks[:, gate.offset : gate.offset + gate.size]
            key, reps = self._split(x.key, m)
            t = x.expand(key, reps, self.b)
            return _G(gate(t, self.masks[reps]), key, len(reps))
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int:
            return _BATCH if n.args[1] == 0 else self.env[n.args[0]].t.shape[n.args[1]]
        return super().run_node(n)

    @staticmethod
    def _split(key: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([key.unsqueeze(1).to(m.dtype), m], 1)
        uniq, new = torch.unique(both, dim=0, return_inverse=True)
        reps = torch.empty(len(uniq), dtype=torch.long)
        reps.scatter_(0, new, torch.arange(len(new)))
        return new, reps

    def _call(self, fn, args, kwargs):
        flat = [a for a in list(args) + list(kwargs.values()) if isinstance(a, _G)]
        flat += [x for a in list(args) if isinstance(a, (list, tuple)) for x in a if isinstance(x, _G)]
        if not flat:
            return fn(*args, **kwargs)
        first = flat[0]
        if all(g.key is first.key for g in flat):
            key, reps, groups = first.key, None, first.groups
        else:
            key, reps = _refine([g.key for g in flat])
            groups = len(reps)

        def unwrap(a):
            if isinstance(a, _G):
                return a.t if reps is None else a.expand(key, reps, self.b)
            if isinstance(a, (list, tuple)):
                return type(a)(unwrap(x) for x in a)
            return a

        args, kwargs = [unwrap(a) for a in args], {k: unwrap(v) for k, v in kwargs.items()}
        if args and isinstance(args[0], torch.Tensor):
            args = [self._fix_shape(args[0], a) for a in args]
        result = fn(*args, **kwargs)
        if isinstance(result, torch.Tensor) and result.ndim > 0 and result.shape[0] == groups * self.b:
            return _G(result, key, groups)
        return result

    @staticmethod
    def _fix_shape(t: torch.Tensor, a):
        if a is _BATCH:
            return t.shape[0]
        if isinstance(a, (list, tuple)) and any(x is _BATCH for x in a):
            return type(a)(t.shape[0] if x is _BATCH else x for x in a)
        return a

    def call_function(self, target, args, kwargs):
        return self._call(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        return self._call(lambda s, *a, **k: getattr(s, target)(*a, **k), args, kwargs)

    def call_module(self, target, args, kwargs):
        return self._call(self.fetch_attr(target), args, kwargs)


class GroupedGame(NeuronGame):
    """A NeuronGame whose coalitions are evaluated grouped by their upstream masks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._grouped = GroupedSuffix(self.model.suffix)

    @torch.inference_mode()
    def evaluate(self, sample, masks, lanes):
        masks = masks.to(self.device, self._inputs.dtype)
        out = self._grouped.evaluate(sample.frontier, sample.lane_rows, lanes, masks)
        out = out.reshape(masks.shape[0], self.batch_size, -1)
        groups = None if sample.groups is None else sample.groups[lanes]
        return self.metric(out, sample.labels[lanes], groups).cpu()


def main(argv: list[str] | None = None) -> None:
    from bench.bench_estimator import FULL, QUICK, build_model
    from examples.digits import load_digits_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    split = load_digits_split()
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("digits", "wide"):
            model = build_model(kind, scale, split, Path(tmp))
            iterations = scale.throughput_iterations[kind]
            base = NeuronGame(model.graph, model.data, MetricSpec("accuracy"), batch_size=128)
            grouped = GroupedGame(model.graph, model.data, MetricSpec("accuracy"), batch_size=128)
            print(f"\n{model.label}: {base.n_players} neurons, {iterations} permutations per run, batch 128")
            print(f"{'evaluation':<34}{'coalitions/pass':>16}{'evals/s':>10}{'rows/s':>10}  same values as library")
            reference_values = {}
            for label, game, lanes, cpp in (
                ("library, one per pass", base, 1, 1),
                ("library, batched (defaults)", base, 4, 64),
                ("library, 1 lane x 8/pass", base, 1, 8),
                ("grouped, batched (defaults)", grouped, 4, 64),
                ("grouped, 1 lane x 8/pass", grouped, 1, 8),
                ("grouped, 1 lane x 16/pass", grouped, 1, 16),
            ):
                cfg = TMABConfig(mode="all", truncation=0.0, min_samples=OFF, lanes=lanes, coalitions_per_pass=cpp,
                                 seed=5, max_iterations=iterations)
                run_tmab(game, replace_iterations(cfg, 1))  # warm-up
                t = time.perf_counter()
                est = run_tmab(game, cfg)
                dt = time.perf_counter() - t
                same = "-"
                key = lanes  # the pass size does not change which coalitions are evaluated
                if key in reference_values:
                    same = "yes" if torch.allclose(est.values, reference_values[key], atol=1e-12) else "NO"
                elif game is base:
                    reference_values[key] = est.values
                per_pass = min(cpp, game.max_coalitions_per_pass)
                print(f"{label:<34}{per_pass:>16}{est.evaluations / dt:>10.0f}{est.rows / dt:>10.0f}  {same}")


def replace_iterations(cfg: TMABConfig, n: int) -> TMABConfig:
    from dataclasses import replace

    return replace(cfg, max_iterations=n)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Evaluating a pass's coalitions grouped by their upstream masks.

Why. A pass holds runs of consecutive coalitions of one permutation walk, and
consecutive coalitions differ by a neuron or a few. Two coalitions that keep
the same neurons in every gated layer *before* some layer have identical
activations up to that layer, yet the plain suffix repeats the batch once per
coalition and recomputes all of it. In 16 consecutive steps of a walk over a
CNN with 16 channels in its first gated layer and 1,024 in its second, the
first layer's masks take one or two distinct values: the second convolution,
nearly all of the work, runs once or twice instead of 16 times. On a CPU,
where a single coalition's pass is already compute-bound, this is where the
batched evaluation's speed comes from.

How. :class:`GroupedSuffix` runs the suffix graph node by node. A per-example
value is held once per *group* of coalitions (``[G·B, …]``), with ``key[m]``
naming the group of coalition ``m``. At each gate the groups split by that
layer's masks; an op whose inputs are grouped differently first expands them
to their common refinement. A size read from the batch dimension
(``sym_size``) becomes a marker that a later reshape resolves to the batch of
the tensor it reshapes. The output is expanded to one block of rows per
coalition, so the metric sees exactly what the plain suffix gives.

The interpreter handles ops generically, which a model can defeat (a shape
read through another route, an op mixing examples). So a model uses it only
after :func:`grouping_matches` has found it equal to the plain suffix on
coalitions built to share and split groups at every gate.
"""

from __future__ import annotations

import torch
import torch.fx

from .masking import Gate, MaskedModel

__all__ = ["GroupedSuffix", "grouping_matches"]


class _Batch:
    """Marker for "the first dimension of the tensor this size is applied to"."""


_BATCH = _Batch()


class _Grouped:
    """A per-example value held once per group: ``t`` is ``[G·B, …]``; ``key[m]`` is coalition ``m``'s group."""

    __slots__ = ("t", "key", "groups")

    def __init__(self, t: torch.Tensor, key: torch.Tensor, groups: int) -> None:
        self.t, self.key, self.groups = t, key, groups

    def expand(self, reps: torch.Tensor, b: int) -> torch.Tensor:
        """Rows for a finer grouping whose group ``g`` holds coalition ``reps[g]``."""
        old = self.key[reps]
        if self.groups == len(reps) and torch.equal(old, torch.arange(len(reps), device=old.device)):
            return self.t
        t = self.t.reshape(self.groups, b, *self.t.shape[1:])[old]
        return t.reshape(len(reps) * b, *self.t.shape[1:])


def _representatives(inverse: torch.Tensor, groups: int) -> torch.Tensor:
    """One coalition of each group, given each coalition's group."""
    reps = torch.empty(groups, dtype=torch.long, device=inverse.device)
    reps.scatter_(0, inverse, torch.arange(len(inverse), device=inverse.device))
    return reps


def _refine(keys: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The common refinement of several groupings: (each coalition's new group, a coalition of each)."""
    uniq, key = torch.unique(torch.stack(keys, 1), dim=0, return_inverse=True)
    return key, _representatives(key, len(uniq))


class GroupedSuffix(torch.fx.Interpreter):
    """Runs a :class:`MaskedModel`'s suffix with each per-example value computed once per group of coalitions."""

    @torch.inference_mode()
    def evaluate(self, frontier: tuple[torch.Tensor, ...], lane_rows: torch.Tensor, lanes: torch.Tensor,
                 masks: torch.Tensor) -> torch.Tensor:
        """Outputs ``[M·B, …]`` for coalitions ``masks`` (``[M, n]``), coalition ``m`` on batch ``lanes[m]``."""
        self.b = lane_rows.shape[1]
        self.masks = masks
        used, key = torch.unique(lanes, return_inverse=True)
        self.lane_rows = lane_rows[used].reshape(-1)
        self.lane_key, self.lane_groups = key, len(used)
        result = self.run(*frontier, None, masks)
        every = torch.arange(masks.shape[0], device=masks.device)
        return result.expand(every, self.b)

    def run_node(self, n: torch.fx.Node):
        if n.op == "call_function" and n.target is torch.index_select:  # the frontier repeated per lane
            return _Grouped(torch.index_select(self.env[n.args[0]], 0, self.lane_rows), self.lane_key,
                            self.lane_groups)
        if n.op == "call_module" and isinstance(gate := self.module.get_submodule(n.target), Gate):
            x: _Grouped = self.env[n.args[0]]
            m = self.masks[:, gate.offset : gate.offset + gate.size]
            both = torch.cat([x.key.unsqueeze(1).to(m.dtype), m], 1)
            uniq, key = torch.unique(both, dim=0, return_inverse=True)
            reps = _representatives(key, len(uniq))
            t = x.expand(reps, self.b)
            return _Grouped(gate(t, self.masks[reps], in_place=t is not x.t), key, len(reps))
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int and n.args[1] == 0:
            return _BATCH
        return super().run_node(n)

    def _call(self, fn, args, kwargs):
        grouped = [a for a in (*args, *kwargs.values()) if isinstance(a, _Grouped)]
        grouped += [x for a in args if isinstance(a, (list, tuple)) for x in a if isinstance(x, _Grouped)]
        if not grouped:
            return fn(*args, **kwargs)
        first = grouped[0]
        if all(g.key is first.key for g in grouped):
            key, reps, groups = first.key, None, first.groups
        else:
            key, reps = _refine([g.key for g in grouped])
            groups = len(reps)

        def unwrap(a):
            if isinstance(a, _Grouped):
                return a.t if reps is None else a.expand(reps, self.b)
            if isinstance(a, (list, tuple)):
                return type(a)(unwrap(x) for x in a)
            return a

        args, kwargs = [unwrap(a) for a in args], {k: unwrap(v) for k, v in kwargs.items()}
        if args and isinstance(args[0], torch.Tensor):
            args = [_resolve_batch(args[0], a) for a in args]
        result = fn(*args, **kwargs)

        def wrap(r):
            if isinstance(r, torch.Tensor) and r.ndim > 0 and r.shape[0] == groups * self.b:
                return _Grouped(r, key, groups)
            return r

        return type(result)(wrap(r) for r in result) if isinstance(result, (list, tuple)) else wrap(result)

    def call_function(self, target, args, kwargs):
        return self._call(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        return self._call(lambda s, *a, **k: getattr(s, target)(*a, **k), args, kwargs)

    def call_module(self, target, args, kwargs):
        return self._call(self.fetch_attr(target), args, kwargs)


def _resolve_batch(t: torch.Tensor, a):
    if a is _BATCH:
        return t.shape[0]
    if isinstance(a, (list, tuple)) and any(x is _BATCH for x in a):
        return type(a)(t.shape[0] if x is _BATCH else x for x in a)
    return a


def grouping_matches(model: MaskedModel, example: torch.Tensor) -> bool:
    """Whether grouped evaluation gives the plain suffix's outputs on ``example`` for coalitions that share
    masks in some layers and not in others, across two batches: the check a model passes before it is used."""
    n, generator = model.n_players, torch.Generator().manual_seed(0)
    b = min(4, example.shape[0])
    x = example[torch.arange(2 * b) % example.shape[0]]
    lane_rows = torch.arange(2 * b).reshape(2, b)
    # Walks through random permutations (neighbours share most masks) plus independent random coalitions.
    walk = [torch.ones(n)]
    for player in torch.randperm(n, generator=generator)[: min(n, 7)]:
        walk.append(walk[-1].clone())
        walk[-1][player] = 0
    masks = torch.cat([torch.stack(walk), (torch.rand(5, n, generator=generator) < 0.5).float(), torch.zeros(1, n)])
    masks = masks.to(example.dtype)
    lanes = torch.arange(len(masks)) % 2
    with torch.inference_mode():
        frontier = model.prefix(x)
        expected = model.run(frontier, lane_rows[lanes].reshape(-1), masks)
        try:
            got = GroupedSuffix(model.suffix).evaluate(frontier, lane_rows, lanes, masks)
        except Exception:  # an op the interpreter cannot follow: the plain suffix it is
            return False
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


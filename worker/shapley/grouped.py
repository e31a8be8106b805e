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

Deferred gates. Splitting at a gate still leaves one block of rows per
coalition from there on, and after the last gate that is most of the memory
traffic (the wide CNN: 1,024 channels × 2×2 × 128 examples per coalition,
only to be averaged). With 0/1 masks a gate merely chooses, per neuron,
between the kept value and the fill, so it commutes with any op that treats
each neuron's features on their own (ReLU, pooling, reshapes): the gate is
carried past them on the unsplit groups, with the fill and a map of which
neuron each feature belongs to carried alongside. At a linear layer the
choice becomes arithmetic: the output is ``bias + Σ_neuron mask ·
contribution``, so the layer runs once per unsplit group, keeping each
neuron's contribution apart, and every coalition's output is one matrix
product of its masks with them, where that costs fewer FLOPs than running the
layer per split group. At a 2-d convolution, each group runs the layer once
at its coalitions' most common mask, and every coalition adds the one-channel
convolutions of the channels it keeps otherwise: a star round's coalitions
differ from that base in one channel each. Anything else gets the gate
applied first.

The interpreter handles ops generically, which a model can defeat (a shape
read through another route, an op mixing examples, an op named like a
per-neuron one that mixes neurons). So a model uses it only after
:func:`grouped_suffix` has found it equal to the plain suffix on coalitions
built to share and split groups at every gate, and falls back a step (not
deferred, then not grouped) where it is not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.fx

from .masking import BuildTimeout, Gate, MaskedModel, close, run_checked

__all__ = ["GroupedSuffix", "grouped_suffix"]


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


class _Deferred:
    """A gate's output not yet split per coalition: kept neurons carry ``x`` (grouped as the gate's input),
    removed ones the fill in ``aux[0]``; ``aux[1]`` holds, for every feature, the neuron it belongs to.
    Ops that treat each neuron's features on their own (:data:`_PER_NEURON`) are applied to ``x`` and ``aux``
    alike, so the gate moves past them onto far fewer rows."""

    __slots__ = ("x", "aux", "gate")

    def __init__(self, x: _Grouped, aux: torch.Tensor, gate: Gate) -> None:
        self.x, self.aux, self.gate = x, aux, gate


# Ops that act on each neuron's features separately, by the name of the function or aten op: with 0/1 masks
# they commute with choosing, per neuron, between the kept value and the fill. A model that uses such a name
# otherwise (a mean over neurons, say) fails the check in :func:`grouped_suffix` and is evaluated undeferred.
_RESHAPES = {"reshape", "view", "flatten", "contiguous", "clone"}
_PER_NEURON = _RESHAPES | {
    "relu",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "mean",
    "amax",
    "global_pool",
    "pad_spatial",
    "dropout",
    "leaky_relu",
    "relu6",
    "elu",
    "gelu",
    "silu",
    "sigmoid",
    "tanh",
    "hardtanh",
    "hardswish",
    "softplus",
}
_WRITE = 8  # multiply-adds that writing one value costs, for weighing a split convolution (GroupedSuffix._conv2d)
_SHAPE_READS = {"shape", "size"}  # read off the unsplit rows, which the reshape that uses them will see


def _op_name(op) -> str:
    name = op if isinstance(op, str) else getattr(getattr(op, "overloadpacket", op), "__name__", "")
    return name.lstrip("_")


def _split(key: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups refined by a gate's masks ``m``: (each coalition's new group, a coalition of each)."""
    both = torch.cat([key.unsqueeze(1).to(m.dtype), m], 1)
    uniq, new = torch.unique(both, dim=0, return_inverse=True)
    return new, _representatives(new, len(uniq))


class GroupedSuffix(torch.fx.Interpreter):
    """Runs a :class:`MaskedModel`'s suffix with each per-example value computed once per group of coalitions.

    Args:
        suffix: the masked model's suffix graph.
        defer: carry each gate's masks past per-neuron ops, and into the next linear layer as a matrix
            product where that saves work (the module docstring says why and when).
        memory_bytes: the most memory one layer's per-neuron contributions may take.
    """

    def __init__(self, suffix: torch.fx.GraphModule, defer: bool = True, memory_bytes: int = 256 << 20) -> None:
        super().__init__(suffix)
        self.defer, self.memory_bytes = defer, memory_bytes
        # The load-time check (grouped_suffix) takes both paths at every linear layer it can split, and stops
        # the run at a deadline between nodes.
        self.checking = False
        self.check: Callable[[], None] | None = None

    @torch.inference_mode()
    def evaluate(
        self, frontier: tuple[torch.Tensor, ...], lane_rows: torch.Tensor, lanes: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """Outputs ``[M·B, …]`` for coalitions ``masks`` (``[M, n]``), coalition ``m`` on batch ``lanes[m]``."""
        self.b = lane_rows.shape[1]
        self.masks = masks
        used, key = torch.unique(lanes, return_inverse=True)
        self.lane_rows = lane_rows[used].reshape(-1)
        self.lane_key, self.lane_groups = key, len(used)
        result = self._settle(self.run(*frontier, None, masks))
        every = torch.arange(masks.shape[0], device=masks.device)
        return result.expand(every, self.b)

    def run_node(self, n: torch.fx.Node):
        if self.check is not None:
            self.check()
        # The suffix graph's index_select and gate nodes take a node as their first argument (masking.py builds
        # them so), and a call_module node's target is the module's dotted path.
        if n.op == "call_function" and n.target is torch.index_select:  # the frontier repeated per lane
            rows = torch.index_select(self.env[cast(torch.fx.Node, n.args[0])], 0, self.lane_rows)
            return _Grouped(rows, self.lane_key, self.lane_groups)
        if n.op == "call_module" and isinstance(gate := self.module.get_submodule(cast(str, n.target)), Gate):
            x = self._settle(self.env[cast(torch.fx.Node, n.args[0])])
            deferred = _Deferred(x, _aux(gate, x.t), gate)
            return deferred if self.defer else self._settle(deferred)
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int and n.args[1] == 0:
            return _BATCH
        return super().run_node(n)

    def _settle(self, a):
        """``a`` with a deferred gate applied: one block of rows per group of its refined grouping."""
        if not isinstance(a, _Deferred):
            return a
        gate, x = a.gate, a.x
        m = self.masks[:, gate.offset : gate.offset + gate.size]
        key, reps = _split(x.key, m)
        t = x.expand(reps, self.b)
        fill, neuron = a.aux[0], a.aux[1].long()
        keep = m[reps][:, neuron].unsqueeze(1)  # [G, 1, *features]
        rows = t.reshape(len(reps), self.b, *t.shape[1:])
        if fill.any():
            out = torch.where(keep.bool(), rows, fill)
        else:
            out = rows.mul_(keep) if t is not x.t else rows * keep
        return _Grouped(out.reshape(t.shape), key, len(reps))

    def _call(self, op, fn, args, kwargs):
        if args and isinstance(args[0], _Deferred) and not any(map(_holds_rows, (*args[1:], *kwargs.values()))):
            name = _op_name(op)
            if name in _PER_NEURON:
                return self._past(name, fn, args[0], args[1:], kwargs)
            if name in _SHAPE_READS:
                return fn(args[0].x.t, *args[1:], **kwargs)
            out = None
            if name == "linear":
                out = self._linear(*args, **kwargs)
            elif name == "conv2d":
                out = self._conv2d(fn, *args, **kwargs)
            if out is not None:
                if self.checking and not self._same(out, self._generic(fn, args, kwargs)):
                    raise ValueError(f"a {name} layer split by neuron differs from the layer run after its gate")
                return out
        return self._generic(fn, args, kwargs)

    def _same(self, a: _Grouped, b) -> bool:
        every = torch.arange(self.masks.shape[0], device=self.masks.device)
        return isinstance(b, _Grouped) and close(a.expand(every, self.b), b.expand(every, self.b))

    def _generic(self, fn, args, kwargs):
        """``fn`` on the gate-applied, commonly grouped values of its arguments."""
        args = [
            self._settle(a) if not isinstance(a, (list, tuple)) else type(a)(self._settle(x) for x in a) for a in args
        ]
        kwargs = {k: self._settle(v) for k, v in kwargs.items()}
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

    def _past(self, name: str, fn, d: _Deferred, rest: tuple, kwargs: dict) -> _Deferred:
        """A per-neuron op applied before the deferred gate: to the input's groups, and to the fill and the
        neuron map (a reshape by the values' new shape: its arguments may hold the rows' count)."""
        t = fn(d.x.t, *[_resolve_batch(d.x.t, a) for a in rest], **kwargs)
        if name in _RESHAPES:
            aux = d.aux.reshape(2, *t.shape[1:])
        else:
            aux = fn(d.aux, *[_resolve_batch(d.aux, a) for a in rest], **kwargs)
        if aux.shape != (2, *t.shape[1:]) or t.shape[0] != d.x.t.shape[0]:
            raise ValueError(f"{name} moves values between examples")  # grouped_suffix falls back
        return _Deferred(_Grouped(t, d.x.key, d.x.groups), aux, d.gate)

    def _linear(self, d: _Deferred, weight: torch.Tensor, bias: torch.Tensor | None = None) -> _Grouped | None:
        """A linear layer right after a deferred gate, as ``bias + Σ_neuron mask · contribution``: the layer
        runs once per group of its input, split by the gate's neuron, and each refined group's output is one
        matrix product of its masks with those contributions. ``None`` where that does not pay (or the
        layer's input is not laid out neuron by neuron): the caller applies the gate and runs the layer."""
        x, fill, neuron, n = d.x.t, d.aux[0], d.aux[1], d.gate.size
        if (
            x.ndim != 2
            or x.shape[1] % n
            or not torch.equal(
                neuron, torch.arange(n, device=x.device, dtype=x.dtype).repeat_interleave(x.shape[1] // n)
            )
        ):
            return None
        m = self.masks[:, d.gate.offset : d.gate.offset + n]
        key, reps = _split(d.x.key, m)
        outputs = weight.shape[0]
        # Per example: the layer costs 2·weight FLOPs a group; mixing, 2·n·outputs a refined group.
        pays = d.x.groups * weight.numel() + len(reps) * n * outputs < len(reps) * weight.numel()
        if x.shape[0] * n * outputs * x.element_size() > self.memory_bytes or not (pays or self.checking):
            return None
        w = weight.reshape(outputs, n, -1).permute(1, 2, 0)  # [neuron, its features, outputs]

        def per_neuron(v: torch.Tensor) -> torch.Tensor:  # [neuron, rows of v, outputs]
            return torch.bmm(v.reshape(v.shape[0], n, -1).transpose(0, 1), w)

        parts = per_neuron(x)
        if fill.any():
            parts -= per_neuron(fill.unsqueeze(0))
        parts = parts.reshape(n, d.x.groups, self.b * outputs)
        keep, source = m[reps], d.x.key[reps]
        out = torch.empty(len(reps), self.b * outputs, dtype=x.dtype, device=x.device)
        for g in torch.unique(source).tolist():
            mine = torch.nonzero(source == g).squeeze(1)
            out[mine] = keep[mine] @ parts[:, g]
        out = out.reshape(len(reps) * self.b, outputs)
        out += torch.nn.functional.linear(fill.unsqueeze(0), weight, bias)
        return _Grouped(out, key, len(reps))

    def _conv2d(
        self,
        fn,
        d: _Deferred,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
    ) -> _Grouped | None:
        """A 2-d convolution right after a deferred gate, as each input group's convolution at one *base* mask
        (the group's most common one) plus, for every coalition, the convolutions of the few channels it keeps
        otherwise. The layer is linear in its input, so keeping channel c where the base removes it moves the
        output by ``conv_c(x_c − fill_c)``, and removing it by minus that. The coalitions of a star round differ
        from their base in one channel each, and of a walk's pass in a few, while one channel's convolution
        costs about 1/n of the layer: it runs as a matrix product of the channel's patches, because oneDNN's
        convolution of one input channel is bound by writing its output and costs half the whole layer (on
        the wide CNN's conv2). ``None`` where that does not pay, or the layer is not one this can follow."""
        x, fill, neuron, n = d.x.t, d.aux[0], d.aux[1], d.gate.size
        if groups != 1 or x.ndim != 4 or isinstance(padding, str) or weight.shape[1] != n:
            return None
        channel = torch.arange(n, device=x.device, dtype=x.dtype).reshape(n, 1, 1)
        if not torch.equal(neuron, channel.expand_as(neuron)):
            return None
        m = self.masks[:, d.gate.offset : d.gate.offset + n]
        key, reps = _split(d.x.key, m)
        keep, source = m[reps], d.x.key[reps]
        inputs, g = d.x.groups, len(reps)
        votes = torch.zeros(inputs, n, dtype=keep.dtype, device=keep.device).index_add_(0, source, keep)
        base = 2 * votes > torch.bincount(source, minlength=inputs).unsqueeze(1)
        diff = keep - base[source].to(keep.dtype)  # +1: kept where the base removes it; -1: the reverse
        flipped, channels = torch.nonzero(diff, as_tuple=True)
        kernel, outputs = weight[0, 0].numel(), weight.shape[0]
        # Multiply-adds per example and output feature: the layer costs n·kernel a group; split, n·kernel an
        # input group, and for each flipped channel of a group its own convolution (a kernel) and two writes
        # (its output, and adding it), and a write for each group's copy of its base.
        split_cost = inputs * n * kernel + len(flipped) * (kernel + 2 * _WRITE) + g * _WRITE
        memory = len(flipped) * self.b * outputs * x[0, 0].numel() * x.element_size()
        if not len(flipped) or memory > self.memory_bytes or not (split_cost < g * n * kernel or self.checking):
            return None
        b, spatial = self.b, x.shape[2:]
        stride, padding, dilation = (
            [*v] if isinstance(v, (list, tuple)) else [v, v] for v in (stride, padding, dilation)
        )
        xs = x.reshape(inputs, b, n, *spatial)
        base_in = torch.where(base[:, None, :, None, None], xs, fill).reshape(inputs * b, n, *spatial)
        # Channels last, so that each group's copy of its base and the flips added to it are contiguous rows.
        base_out = fn(base_in.contiguous(memory_format=torch.channels_last), weight, bias, stride, padding, dilation, 1)
        out_spatial = base_out.shape[2:]
        out = base_out.permute(0, 2, 3, 1).reshape(inputs, -1, outputs).index_select(0, source)  # [g, b·P, O]
        # Each flip's change, the sign folded into the input, convolved as patches × the channel's weights.
        order = torch.argsort(channels, stable=True)
        flipped, channels = flipped[order], channels[order]
        one = xs[source[flipped], :, channels] - fill[channels].unsqueeze(1)  # [flips, b, *spatial]
        one *= diff[flipped, channels].reshape(-1, 1, 1, 1)
        patches = torch.nn.functional.unfold(
            one.reshape(-1, 1, *spatial), weight.shape[2:], dilation=dilation, padding=padding, stride=stride
        ).transpose(1, 2)  # [flips·b, positions, kernel]
        patches = patches.reshape(len(flipped), -1, kernel)  # [flips, b·positions, kernel]
        w = weight.reshape(outputs, n, kernel).permute(1, 2, 0).contiguous()  # [n, kernel, outputs]: BLAS's layout
        deltas = torch.empty(len(flipped), out.shape[1], outputs, dtype=x.dtype, device=x.device)
        at = 0
        for c, count in zip(*(t.tolist() for t in torch.unique_consecutive(channels, return_counts=True)), strict=True):
            torch.mm(patches[at : at + count].view(-1, kernel), w[c], out=deltas[at : at + count].view(-1, outputs))
            at += count
        out.index_add_(0, flipped, deltas)
        # Back to [rows, outputs, *spatial], as a channels-last view: the next ops take any layout.
        return _Grouped(out.view(g * b, *out_spatial, outputs).permute(0, 3, 1, 2), key, g)

    def call_function(self, target, args, kwargs):
        return self._call(target, target, args, kwargs)

    def call_method(self, target, args, kwargs):
        return self._call(target, lambda s, *a, **k: getattr(s, target)(*a, **k), args, kwargs)

    def call_module(self, target, args, kwargs):
        return self._call(None, self.fetch_attr(target), args, kwargs)


def _holds_rows(a) -> bool:
    if isinstance(a, (list, tuple)):
        return any(map(_holds_rows, a))
    return isinstance(a, (_Grouped, _Deferred))


def _aux(gate: Gate, x: torch.Tensor) -> torch.Tensor:
    """``[2, *features]``: the fill a removed neuron takes, and each feature's neuron (as a float, so that
    pooling and reshapes can carry it along)."""
    shape = [1] * (x.ndim - 1)
    shape[gate.channel_dim % x.ndim - 1] = gate.size
    neuron = torch.arange(gate.size, dtype=x.dtype, device=x.device).reshape(shape).expand(x.shape[1:])
    fill = torch.zeros_like(neuron) if gate.fill is None else gate.fill.reshape(shape).expand(x.shape[1:])
    return torch.stack([fill, neuron])


def _resolve_batch(t: torch.Tensor, a):
    if a is _BATCH:
        return t.shape[0]
    if isinstance(a, (list, tuple)) and any(x is _BATCH for x in a):
        return type(a)(t.shape[0] if x is _BATCH else x for x in a)
    return a


def grouped_suffix(
    model: MaskedModel,
    example: torch.Tensor,
    memory_bytes: int = 256 << 20,
    check: Callable[[], None] | None = None,
) -> GroupedSuffix | None:
    """The fastest grouped evaluation that gives the plain suffix's outputs on ``example``, or ``None``.

    The check runs coalitions that share masks in some layers and not in others, across two batches of two
    examples (few coalitions and few rows: each row of VGG-19 costs 20 GFLOP, and what the check exercises is
    how groups share, split and expand, which needs neither more). Deferred gates are split into every linear
    layer that can take them, and at each such layer the result is compared with the layer run after its gate,
    so that whichever a pass picks (the split where it pays) is checked in one run; then, only where that
    fails, without deferring. A model the interpreter cannot follow falls back a step, never to wrong values.
    ``check`` is called between nodes (it raises to stop the build at its deadline).
    """
    n, generator = model.n_players, torch.Generator().manual_seed(0)
    b = min(2, example.shape[0])
    x = example[torch.arange(2 * b) % example.shape[0]]
    lane_rows = torch.arange(2 * b).reshape(2, b)
    # A walk through a random permutation (neighbours share most masks: groups that share and split), a random
    # coalition (split at every gate) and the empty one (every fill).
    walk = [torch.ones(n)]
    for player in torch.randperm(n, generator=generator)[: min(n, 4)]:
        walk.append(walk[-1].clone())
        walk[-1][player] = 0
    masks = torch.cat([torch.stack(walk), (torch.rand(1, n, generator=generator) < 0.5).float(), torch.zeros(1, n)])
    masks = masks.to(example.dtype)
    lanes = torch.arange(len(masks)) % 2
    with torch.inference_mode():
        frontier = run_checked(model.prefix, x, check=check)
        expected = run_checked(model.suffix, *frontier, lane_rows[lanes].reshape(-1), masks, check=check)

    def matches(suffix: GroupedSuffix) -> bool:
        suffix.check = check
        try:
            got = suffix.evaluate(frontier, lane_rows, lanes, masks)
        except BuildTimeout:
            raise
        except Exception:  # an op the interpreter cannot follow
            return False
        finally:
            suffix.check = None
        return got.shape == expected.shape and close(got, expected)

    deferred = GroupedSuffix(model.suffix, True, memory_bytes)
    deferred.checking = True
    if matches(deferred):
        deferred.checking = False
        return deferred
    undeferred = GroupedSuffix(model.suffix, False)
    return undeferred if matches(undeferred) else None

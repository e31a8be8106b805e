"""Which FX call targets are neurons, and which may follow a neuron and still be "its" output.

Both model loaders produce graphs of either ATen ops (``torch.export``) or
``torch.nn.functional`` calls (our ONNX importer), so each set lists both.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

aten = torch.ops.aten

CONV_TARGETS = frozenset(
    {
        aten.conv1d.default,
        aten.conv2d.default,
        aten.conv3d.default,
        aten.convolution.default,
        F.conv1d,
        F.conv2d,
        F.conv3d,
    }
)
LINEAR_TARGETS = frozenset({aten.linear.default, F.linear})

# Elementwise or per-channel ops that map a silent channel to a constant: a
# neuron is removed after the longest run of these that only it feeds, so
# that a removed neuron is silent rather than "outputs BatchNorm's bias".
CHAIN_TARGETS = frozenset(
    {
        aten.batch_norm.default,
        aten._native_batch_norm_legit_no_training.default,
        F.batch_norm,
        aten.relu.default,
        aten.relu_.default,
        torch.relu,
        F.relu,
        aten.relu6.default,
        F.relu6,
        aten.leaky_relu.default,
        F.leaky_relu,
        aten.hardtanh.default,
        aten.hardtanh_.default,
        F.hardtanh,
        aten.elu.default,
        F.elu,
        aten.gelu.default,
        F.gelu,
        aten.silu.default,
        F.silu,
        aten.hardswish.default,
        F.hardswish,
        aten.hardsigmoid.default,
        F.hardsigmoid,
        aten.sigmoid.default,
        torch.sigmoid,
        aten.tanh.default,
        torch.tanh,
        aten.dropout.default,
        F.dropout,
    }
)

# Ops returning a tuple whose element 0 continues the chain.
TUPLE_CHAIN_TARGETS = frozenset({aten._native_batch_norm_legit_no_training.default})
GETITEM = operator.getitem

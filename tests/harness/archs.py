"""Small look-alikes of today's torchvision/timm architectures, for the converter and loader tests.

torchvision does not install beside our torch wheel, so each network here
rebuilds the constructs its family exports (depthwise convs and
squeeze-excitation in MobileNetV3, channel shuffle in ShuffleNetV2, residual
adds in ResNet, Concat branches in Inception, LayerNorm/GELU/attention in
ConvNeXt and ViT) at a low resolution, with the module names torchvision
uses, so the layer names the tests expect are the ones users know.  Below
them, small ONNX graphs built node by node with ``onnx.helper``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

# A torch.onnx.export configuration: (dynamo, opset_version).
Exporter = tuple[bool, int]


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation with MobileNetV3's Hardsigmoid gate."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class MobileNetV3Like(nn.Module):
    """Stem, an inverted residual (expand, depthwise, SE, project) and MobileNetV3's classifier."""

    input_shape = (3, 16, 16)

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardswish()
        )
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.depthwise = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
        )
        self.se = SqueezeExcitation(16, 4)
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(8, 12), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(12, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.se(self.depthwise(self.expand(x))))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 channel shuffle: view, transpose, view."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(n, -1, h, w)


class ShuffleNetV2Like(nn.Module):
    """A stride-1 ShuffleNetV2 unit: chunk the channels, transform one half, concat, shuffle."""

    input_shape = (3, 12, 12)

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.branch2 = nn.Sequential(
            nn.Conv2d(4, 4, 1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
        )
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((x1, self.branch2(x2)), dim=1), 2)
        return self.fc(x.mean([2, 3]))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock with a strided 1x1 downsample."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNetLike(nn.Module):
    """ResNet's stem, one BasicBlock stage, adaptive average pooling and fc."""

    input_shape = (3, 16, 16)

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 12, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.layer1(x)), 1))


class InceptionLike(nn.Module):
    """An Inception block: 1x1, 3x3, double-3x3 and pool branches concatenated on channels."""

    input_shape = (3, 12, 12)

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.Conv2d_1a = nn.Conv2d(3, 8, 3, padding=1)
        self.branch1x1 = nn.Conv2d(8, 4, 1)
        self.branch3x3_1 = nn.Conv2d(8, 3, 1)
        self.branch3x3_2 = nn.Conv2d(3, 4, 3, padding=1)
        self.branch3x3dbl = nn.Sequential(nn.Conv2d(8, 3, 1), nn.ReLU(), nn.Conv2d(3, 4, (1, 3), padding=(0, 1)))
        self.branch_pool = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.Conv2d_1a(x))
        branches = [
            F.relu(self.branch1x1(x)),
            F.relu(self.branch3x3_2(F.relu(self.branch3x3_1(x)))),
            F.relu(self.branch3x3dbl(x)),
            F.relu(self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))),
        ]
        x = F.adaptive_avg_pool2d(torch.cat(branches, 1), (1, 1))
        return self.fc(torch.flatten(x, 1))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7, channels-last LayerNorm, Linear-GELU-Linear, layer scale."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class Attention(nn.Module):
    """timm's ViT attention: fused qkv, per-head scaled dot product with Softmax, projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.scale
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class TransformerLike(nn.Module):
    """ConvNeXt stem and block, then a ViT encoder block on the patches, a class token and a linear head."""

    input_shape = (3, 8, 8)

    def __init__(self, classes: int = 5, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.block = ConvNeXtBlock(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=2)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))
        return self.head(x[:, 0])


class FixedPoolNet(nn.Module):
    """AlexNet's old head: a fixed 8×8 average pool (the whole map at 16×16) before a Flatten and Linear."""

    input_shape = (3, 16, 16)

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU())
        self.avgpool = nn.AvgPool2d(8)
        self.classifier = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class FixedViewNet(FixedPoolNet):
    """A head that reshapes to a constant ``[-1, 256]``, as ``x.view(-1, 256)`` exports."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).view(-1, 4 * 8 * 8)[:, :4])


ARCHS: dict[str, type[nn.Module]] = {
    "mobilenetv3": MobileNetV3Like,
    "shufflenetv2": ShuffleNetV2Like,
    "resnet": ResNetLike,
    "inception": InceptionLike,
    "transformer": TransformerLike,
}
# Graphs that fix the spatial size, for the checks of data at another size.
FIXED_SIZE: dict[str, type[nn.Module]] = {"fixed_pool": FixedPoolNet, "fixed_view": FixedViewNet}


def build(name: str) -> nn.Module:
    """The architecture ``name`` in eval mode, seeded, with BatchNorm statistics that matter."""
    torch.manual_seed(0)
    model = {**ARCHS, **FIXED_SIZE}[name]().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return model


def export_onnx(model: nn.Module, path: Path, exporter: Exporter) -> Path:
    """``torch.onnx.export`` with a dynamic batch, by the legacy (TorchScript) or the dynamo exporter."""
    dynamo, opset = exporter
    example = (torch.randn(2, *model.input_shape),)
    if dynamo:
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=True,
            opset_version=opset,
            external_data=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )
    else:
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}},
        )
    return path


def export_pt2(model: nn.Module, path: Path) -> Path:
    """``torch.export`` with a dynamic batch, saved as a ``.pt2`` archive."""
    program = torch.export.export(
        model, (torch.randn(2, *model.input_shape),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    torch.export.save(program, str(path))
    return path


# --------------------------------------------------------------------------
# ONNX graphs built node by node, for the op-by-op checks against onnxruntime.


def onnx_graph(
    nodes: list[onnx.NodeProto],
    consts: dict[str, np.ndarray] | None = None,
    opset: int = 17,
    x_shape: tuple = (2, 3, 7, 7),
    extra_opsets: tuple = (),
    y_shape: tuple | None = None,
) -> onnx.ModelProto:
    """A model of ``nodes`` from input ``x`` (float) to output ``y``, with ``consts`` as initializers.

    ``y``'s type is inferred, or declared as ``y_shape`` where shape inference cannot follow the graph.
    """
    y = (
        helper.make_empty_tensor_value_info("y")
        if y_shape is None
        else helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
    )
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [y],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in (consts or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    return onnx.shape_inference.infer_shapes(model)  # fills in y's type, which the checker requires


def rand(*shape: int) -> np.ndarray:
    """Standard normal float32 values, seeded by the shape."""
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def assert_matches_onnxruntime(model: onnx.ModelProto, x_shape: tuple[int, ...], atol: float) -> None:
    """The converted ``model`` gives onnxruntime's output on a random input: same shape, dtype and values."""
    import onnxruntime

    from worker.shapley.onnx_import import onnx_to_graph_module

    onnx.checker.check_model(model)
    x = rand(*x_shape)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x})
    with torch.no_grad():
        got = onnx_to_graph_module(model.SerializeToString())(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, atol=atol, rtol=1e-5)

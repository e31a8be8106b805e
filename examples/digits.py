"""Small CNNs trained on scikit-learn's handwritten digits (no download needed).

Used by the tests, the benchmark and the quick start. Run as a script to write
a ready-to-rank model and evaluation set:

    python -m examples.digits OUTDIR [--wide]

writes ``OUTDIR/digits_cnn.onnx``, ``OUTDIR/digits_cnn.pt2`` and
``OUTDIR/digits_eval.npz`` (inputs, labels, and a ``groups`` array: 1 for
digits drawn with more ink than the median, 0 otherwise, for the fairness
metrics).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["DigitsCNN", "WideDigitsCNN", "load_digits_split", "train", "export_onnx", "export_pt2", "save_eval_npz"]


class DigitsCNN(nn.Module):
    """112 hidden neurons: conv1 (16, with BatchNorm), conv2 (32), fc1 (64); fc2 gives the 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.reshape(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class WideDigitsCNN(nn.Module):
    """1,040 hidden neurons: conv1 (16) and a wide conv2 (1,024 channels) on 2×2 maps, pooled into fc."""

    def __init__(self, width: int = 1024) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, width, 3, padding=1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 4)
        x = F.relu(self.conv2(x)).mean((2, 3))
        return self.fc(x)


def load_digits_split(seed: int = 0, test_fraction: float = 0.25):
    """(x_train, y_train, x_test, y_test): images as float32 ``[N, 1, 8, 8]`` in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(len(y) * (1 - test_fraction))
    tr, te = order[:cut], order[cut:]
    return torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), torch.from_numpy(x[te]), torch.from_numpy(y[te])


def ink_groups(x: torch.Tensor) -> torch.Tensor:
    """1 for images with more ink than the median image, else 0: a stand-in protected attribute."""
    ink = x.flatten(1).sum(1)
    return (ink > ink.median()).long()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30, seed: int = 0) -> nn.Module:
    """Deterministic Adam training; returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def export_pt2(model: nn.Module, path: str | Path, example: torch.Tensor) -> None:
    ep = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(ep, str(path))


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor) -> None:
    torch.onnx.export(
        model.eval(), (example,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )


def save_eval_npz(path: str | Path, x: torch.Tensor, y: torch.Tensor) -> None:
    np.savez(path, inputs=x.numpy(), labels=y.numpy(), groups=ink_groups(x).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--wide", action="store_true", help="the 1,040-neuron CNN instead of the 112-neuron one")
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = load_digits_split()
    model = train(WideDigitsCNN() if args.wide else DigitsCNN(), x_tr, y_tr)
    accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
    export_onnx(model, args.outdir / "digits_cnn.onnx", x_te[:2])
    export_pt2(model, args.outdir / "digits_cnn.pt2", x_te[:2])
    save_eval_npz(args.outdir / "digits_eval.npz", x_te, y_te)
    print(f"test accuracy {accuracy:.3f}; wrote digits_cnn.onnx, digits_cnn.pt2, digits_eval.npz to {args.outdir}")


if __name__ == "__main__":
    main()

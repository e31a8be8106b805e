"""Small real networks for the tests (and the benchmarks' smoke runs), and saving one as real model files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from examples.digits import export_onnx, export_pt2, save_eval_npz

torch.set_num_threads(max(1, torch.get_num_threads()))


@dataclass
class Saved:
    """A trained module, its evaluation set, and the files they were saved to."""

    module: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    pt2: Path
    onnx: Path
    npz: Path


class TinyMLP(nn.Module):
    """10 hidden neurons (6 + 4): small enough for exact Shapley values by enumeration."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 6)
        self.fc2 = nn.Linear(6, 4)
        self.out = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


class TinyCNN(nn.Module):
    """10 hidden channels (4 with BatchNorm + 6) on the 8×8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


class SmallCNN(nn.Module):
    """56 hidden neurons, cheap enough for long reference runs in the test suite."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.reshape(x.size(0), -1))))


def seeded(cls: type[nn.Module]) -> nn.Module:
    """A fresh model whose initial weights do not depend on which tests ran before."""
    torch.manual_seed(0)
    return cls()


def save(module: nn.Module, x: torch.Tensor, y: torch.Tensor, directory: Path, name: str) -> Saved:
    directory.mkdir(parents=True, exist_ok=True)
    pt2, onnx_path, npz = directory / f"{name}.pt2", directory / f"{name}.onnx", directory / f"{name}.npz"
    export_pt2(module, pt2, x[:2])
    export_onnx(module, onnx_path, x[:2])
    save_eval_npz(npz, x, y)
    return Saved(module, x, y, pt2, onnx_path, npz)


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path

"""Small CNNs trained on scikit-learn's handwritten digits (no download needed).

Used by the tests, the benchmark and the quick start. Run as a script to write
a ready-to-rank model and evaluation set:

    python -m examples.digits OUTDIR [--wide]

writes ``OUTDIR/digits_cnn.onnx``, ``OUTDIR/digits_cnn.pt2`` and
``OUTDIR/digits_eval.npz`` (inputs, labels, and a ``groups`` array: 1 for
digits drawn with more ink than the median, 0 otherwise, for the fairness
metrics).

The files are a function of ``--seed`` (default 0) and the torch build: the
same on every run, whatever the number of cores, and on other x86-64 CPUs
(checked by capping the instruction sets MKL and oneDNN may use, on one
AVX-512 machine):

* Python, NumPy and torch are seeded before the network is built. (torch's
  default generator starts from a random seed in each process, so a network
  built before seeding had new initial weights on every run.)
* :func:`train` draws the batch order from a generator of its own and, for the
  demo (``reproducible=True``), runs on one intra-op thread with deterministic
  algorithms, so the thread count (the number of cores) does not change the bits.
* Run as a script, it also trains on kernels that round the same on every CPU
  (:data:`PORTABLE_ENV`, :func:`portable_kernels`): torch otherwise picks
  vectorised kernels for the instruction set (AVX-512, AVX2…), and each sums in
  its own order. Imported (the tests, the benchmarks), torch is already loaded
  and the training is reproducible on one machine only.

The last line printed gives the SHA-256 of the ONNX file, to compare two runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

# Read by torch and MKL when they load, so set before ``import torch``, and only when run as a script (an importer
# keeps its own kernels): ATen's portable kernels instead of the vectorised ones picked for this CPU, and MKL's
# matrix products in their conditional-numerical-reproducibility mode, the same results on any x86-64 CPU. Set,
# not defaulted: an ATEN_CPU_CAPABILITY=avx2 in the caller's environment would otherwise change the weights.
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
if __name__ == "__main__":
    os.environ.update(PORTABLE_ENV)

import numpy as np  # noqa: E402 (after PORTABLE_ENV, on purpose)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

__all__ = [
    "DigitsCNN",
    "WideDigitsCNN",
    "load_digits_split",
    "seed_everything",
    "build",
    "train",
    "portable_kernels",
    "export_onnx",
    "export_pt2",
    "save_eval_npz",
]


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


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (call it before building a model)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(wide: bool = False, seed: int = 0) -> nn.Module:
    """A freshly initialised :class:`DigitsCNN` (or :class:`WideDigitsCNN`) whose weights depend only on ``seed``."""
    seed_everything(seed)
    return WideDigitsCNN() if wide else DigitsCNN()


TRAIN_THREADS = 1


@contextlib.contextmanager
def _reproducible_kernels() -> Iterator[None]:
    """One intra-op thread and deterministic algorithms for the duration; the caller's settings are restored after.

    The thread count changes the bits: the CPU kernels split their reductions
    (convolution and linear weight gradients, BatchNorm statistics) across
    threads, so a sum is added in a different order on a machine with another
    number of cores, and over 30 epochs of Adam those last-bit differences grow
    into different weights (seen here: 1, 2 and 4 threads give three different
    networks from the same seed). One thread is also no slower: the batches of
    64 8×8 images are too small to share out across cores.
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30, seed: int = 0, reproducible: bool = False
) -> nn.Module:
    """Adam training; returns the model in eval mode.

    The batch order comes from a generator of its own seeded with ``seed``,
    never from global state; seed before building the model (:func:`build`, or
    ``torch.manual_seed``), since its initial weights are drawn when it is
    constructed. ``reproducible`` also runs the loop on one thread with
    deterministic algorithms (:func:`_reproducible_kernels`), so that the
    number of cores does not change the bits: the demo trains so. The tests'
    small networks train on the caller's threads, as they always have, so that
    the models their assertions were written against stay the same.
    """
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with _reproducible_kernels() if reproducible else contextlib.nullcontext():
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=gen).split(64):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    return model.eval()


@contextlib.contextmanager
def portable_kernels() -> Iterator[None]:
    """Convolutions without oneDNN (im2col and MKL's matrix product instead) for the duration.

    oneDNN picks its convolution code for the instruction set of the CPU it
    runs on and ignores ``MKL_CBWR``; with it off, the training is the same on
    any x86-64 CPU provided :data:`PORTABLE_ENV` was in the environment when
    torch loaded (``python -m examples.digits`` sees to that). The training
    takes about 1.5 to 2 times as long (here ~15 s instead of ~9 s for the
    demo's network).
    """
    enabled = torch.backends.mkldnn.enabled
    # Not mkldnn.flags(): it also sets TF32 and warns that there is no Intel GPU. The ignore: torch annotates
    # `enabled` with its descriptor's type (ContextProp); the module attribute reads and takes a bool.
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def export_pt2(model: nn.Module, path: str | Path, example: torch.Tensor) -> None:
    ep = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(ep, str(path))


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor) -> None:
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )


def save_eval_npz(path: str | Path, x: torch.Tensor, y: torch.Tensor) -> None:
    np.savez(path, inputs=x.numpy(), labels=y.numpy(), groups=ink_groups(x).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--wide", action="store_true", help="the 1,040-neuron CNN instead of the 112-neuron one")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the initial weights, the train/test split and the batch order (default 0)",
    )
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=args.seed)
    with portable_kernels():
        model = train(build(args.wide, seed=args.seed), x_tr, y_tr, seed=args.seed, reproducible=True)
    accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
    export_onnx(model, args.outdir / "digits_cnn.onnx", x_te[:2])
    export_pt2(model, args.outdir / "digits_cnn.pt2", x_te[:2])
    save_eval_npz(args.outdir / "digits_eval.npz", x_te, y_te)
    digest = hashlib.sha256((args.outdir / "digits_cnn.onnx").read_bytes()).hexdigest()
    print(f"test accuracy {accuracy:.3f}; wrote digits_cnn.onnx, digits_cnn.pt2, digits_eval.npz to {args.outdir}")
    print(
        f"seed {args.seed}, torch {torch.__version__}: digits_cnn.onnx sha256 {digest[:16]} (the same on every run)",
        flush=True,
    )


if __name__ == "__main__":
    main()

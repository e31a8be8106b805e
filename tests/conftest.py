"""The fixtures: small real networks trained on scikit-learn's digits, saved as real model files.

What they are built from, and everything else tests share, is in ``tests/harness``.
"""

from __future__ import annotations

import contextlib

import pytest
import redis

from examples.digits import DigitsCNN, load_digits_split, train
from tests.harness.models import Saved, SmallCNN, TinyCNN, TinyMLP, save, seeded
from tests.harness.services import sweep_run


def pytest_sessionfinish(session, exitstatus) -> None:
    """Delete what this run left in Redis (a stack that did not end cleanly); other runs' keys stay."""
    with contextlib.suppress(redis.RedisError):
        sweep_run()


@pytest.fixture(scope="session")
def digits():
    return load_digits_split()


@pytest.fixture(scope="session")
def tiny_mlp(digits, tmp_path_factory) -> Saved:
    x_tr, y_tr, x_te, y_te = digits
    model = train(seeded(TinyMLP), x_tr, y_tr, epochs=15)
    return save(model, x_te[:150], y_te[:150], tmp_path_factory.mktemp("tiny_mlp"), "tiny_mlp")


@pytest.fixture(scope="session")
def tiny_cnn(digits, tmp_path_factory) -> Saved:
    x_tr, y_tr, x_te, y_te = digits
    model = train(seeded(TinyCNN), x_tr, y_tr, epochs=15)
    return save(model, x_te[:150], y_te[:150], tmp_path_factory.mktemp("tiny_cnn"), "tiny_cnn")


@pytest.fixture(scope="session")
def small_cnn(digits, tmp_path_factory) -> Saved:
    x_tr, y_tr, x_te, y_te = digits
    model = train(seeded(SmallCNN), x_tr, y_tr, epochs=30)
    return save(model, x_te, y_te, tmp_path_factory.mktemp("small_cnn"), "small_cnn")


@pytest.fixture(scope="session")
def digits_cnn(digits, tmp_path_factory) -> Saved:
    x_tr, y_tr, x_te, y_te = digits
    model = train(seeded(DigitsCNN), x_tr, y_tr, epochs=10)
    return save(model, x_te, y_te, tmp_path_factory.mktemp("digits_cnn"), "digits_cnn")

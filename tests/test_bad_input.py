"""Bad input gets an error that names the problem and the fix, never a crash deep inside torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from examples.digits import DigitsCNN
from tests.harness.models import write_npz
from worker.shapley import (
    DataError,
    MetricSpec,
    ModelError,
    NeuronGame,
    SpecError,
    TMABConfig,
    load_data,
    load_model,
    run_tmab,
)

ACCURACY = MetricSpec("accuracy")


def game(saved, npz=None, metric=ACCURACY, **kwargs) -> NeuronGame:
    return NeuronGame(load_model(saved.pt2), load_data(npz or saved.npz), metric, **kwargs)


def test_data_of_the_wrong_shape_for_the_model(tiny_cnn, tmp_path):
    flat = write_npz(tmp_path / "flat.npz", inputs=tiny_cnn.x.flatten(1).numpy(), labels=tiny_cnn.y.numpy())
    with pytest.raises(DataError, match=r"failed on a batch .* shape \(64,\).*shape the model expects"):
        game(tiny_cnn, flat)


def test_model_exported_with_a_fixed_batch_size(tmp_path, digits):
    model = DigitsCNN().eval()
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(model, (digits[2][:4],)), str(path))
    npz = write_npz(tmp_path / "d.npz", inputs=digits[2][:20].numpy(), labels=digits[3][:20].numpy())
    with pytest.raises(DataError, match="dynamic batch dimension"):
        NeuronGame(load_model(path), load_data(npz), MetricSpec("accuracy"))


def test_glob_matching_no_layer_lists_the_layers(tiny_cnn):
    with pytest.raises(SpecError, match=r"'block9\.\*' match no layer.*conv1, conv2, fc"):
        game(tiny_cnn, layers=["block9.*"])


def test_layer_globs_choose_players(tiny_cnn):
    g = game(tiny_cnn, layers=["conv*"])
    assert [layer.name for layer in g.layers] == ["conv1", "conv2"]
    assert game(tiny_cnn, layers=["fc"]).n_players == 10  # the output layer, when asked for by name


def test_labels_outside_the_models_classes(tiny_cnn, tmp_path):
    npz = write_npz(tmp_path / "l.npz", inputs=tiny_cnn.x.numpy(), labels=(tiny_cnn.y + 5).numpy())
    with pytest.raises(SpecError, match=r"label 14 but the model outputs only 10 classes"):
        game(tiny_cnn, npz)


def test_group_metric_without_groups(tiny_cnn, tmp_path):
    npz = write_npz(tmp_path / "g.npz", inputs=tiny_cnn.x.numpy(), labels=tiny_cnn.y.numpy())
    with pytest.raises(SpecError, match="needs a `groups` array"):
        game(tiny_cnn, npz, MetricSpec("worst_group_accuracy"))


@pytest.mark.parametrize(
    "metric, message",
    [
        (MetricSpec("class_recall"), "needs `class`"),
        (MetricSpec("class_recall", class_=12), "not a class of the model"),
        (MetricSpec("group_accuracy", group=7), r"No example is in group 7"),
        (MetricSpec("group_gap", groups=(1, 1)), "two different group ids"),
        (MetricSpec("f1"), "Unknown metric 'f1'"),
    ],
)
def test_metric_specs_that_make_no_sense(tiny_cnn, metric, message):
    with pytest.raises(SpecError, match=message):
        game(tiny_cnn, metric=metric)


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(inputs=np.zeros((0, 1, 8, 8), np.float32), labels=np.zeros(0, np.int64)), "`inputs` is empty"),
        (dict(inputs=np.full((4, 1, 8, 8), np.nan, np.float32), labels=np.zeros(4, np.int64)), "NaN"),
        (
            dict(inputs=np.zeros((4, 1, 8, 8), np.float32), labels=np.zeros(3, np.int64)),
            r"shape \(3,\) but `inputs` has 4",
        ),
        (dict(inputs=np.zeros((4, 1, 8, 8), np.float32)), "no array named 'labels'"),
        (dict(inputs=np.zeros((4, 1, 8, 8), np.int32), labels=np.zeros(4, np.int64)), "save it as float32"),
        (dict(inputs=np.zeros((4, 1, 8, 8), np.float32), labels=np.array([0, 1, -1, 2])), "negative"),
    ],
)
def test_malformed_data(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message):
        load_data(write_npz(tmp_path / "bad.npz", **arrays))


def test_npz_with_pickled_objects_is_not_unpickled(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, inputs=np.array([{"a": 1}], dtype=object), labels=np.zeros(1, np.int64))
    with pytest.raises(DataError, match="Python objects"):
        load_data(path)


@pytest.mark.parametrize("name", ["garbage.npz", "garbage.safetensors", "garbage.onnx", "garbage.pt2"])
def test_corrupt_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 definitely not a model or a data set \xff" * 10)
    with pytest.raises((DataError, ModelError), match="not a valid|not a torch.export archive"):
        load_model(path) if name.endswith((".onnx", ".pt2")) else load_data(path)


def test_truncated_model_file(tiny_cnn, tmp_path):
    for source in (tiny_cnn.pt2, tiny_cnn.onnx):
        cut = tmp_path / f"cut{source.suffix}"
        cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
        with pytest.raises(ModelError):
            load_model(cut)


def test_unknown_file_kinds(tmp_path):
    (tmp_path / "m.pkl").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"unknown extension '\.pkl'.*\.onnx.*\.pt2"):
        load_model(tmp_path / "m.pkl")
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match=r"unknown extension '\.csv'"):
        load_data(tmp_path / "d.csv")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing.onnx")


def test_safetensors_data_is_read(tiny_cnn, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "d.safetensors"
    save_file({"inputs": tiny_cnn.x.numpy(), "labels": tiny_cnn.y.numpy()}, str(path))
    data = load_data(path)
    assert torch.equal(data.inputs, tiny_cnn.x) and torch.equal(data.labels, tiny_cnn.y)


def test_top_k_larger_than_the_players(tiny_cnn):
    with pytest.raises(SpecError, match="top_k must be between 1 and 9"):
        run_tmab(game(tiny_cnn), TMABConfig(top_k=10))

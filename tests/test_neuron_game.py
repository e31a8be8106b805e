"""The estimator on real networks trained on digits, checked against exact Shapley values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.shapley import (
    MetricSpec,
    NeuronGame,
    TMABConfig,
    exact_shapley,
    load_data,
    load_model,
    relative_weight_norms,
    run_tmab,
)
from worker.shapley.masking import build_masked_model
from worker.shapley.players import find_layers, select_layers

UNTRUNCATED = dict(mode="all", truncation=0.0, half_width=1e-9, min_samples=10**9)

METRICS = [
    MetricSpec("accuracy"),
    MetricSpec("log_likelihood"),
    MetricSpec("class_recall", class_=3),
    MetricSpec("group_accuracy", group=1),
    MetricSpec("worst_group_accuracy"),
    MetricSpec("group_gap", groups=(0, 1)),
]


def whole_set_game(saved, fmt: str, metric: MetricSpec, ablation: str = "zero") -> NeuronGame:
    path = saved.pt2 if fmt == "pt2" else saved.onnx
    return NeuronGame(load_model(path), load_data(saved.npz), metric, ablation=ablation, batch_size=10**6)


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.name)
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_intervals_contain_exact_values_on_a_tiny_mlp(tiny_mlp, metric, ablation):
    game = whole_set_game(tiny_mlp, "pt2", metric, ablation)
    assert game.n_players == 10
    exact = exact_shapley(game.full_values, game.n_players)
    est = run_tmab(game, TMABConfig(**UNTRUNCATED, max_iterations=240, seed=1))
    inside = (est.lower <= exact + 1e-12) & (exact - 1e-12 <= est.upper)
    assert inside.all(), f"exact {exact.tolist()}\nlower {est.lower.tolist()}\nupper {est.upper.tolist()}"
    # the values say something: not all zero, and the bounds are informative
    assert exact.abs().max() > 1e-3
    assert float((est.upper - est.lower).max()) < 0.5 * (1.0 if metric.name != "log_likelihood" else 10.0)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_intervals_contain_exact_values_on_a_tiny_cnn(tiny_cnn, fmt, ablation):
    game = whole_set_game(tiny_cnn, fmt, MetricSpec("accuracy"), ablation)
    assert [(layer.name, layer.size) for layer in game.layers] == [("conv1", 4), ("conv2", 6)]
    exact = exact_shapley(game.full_values, game.n_players)
    est = run_tmab(game, TMABConfig(**UNTRUNCATED, max_iterations=240, seed=2))
    assert ((est.lower <= exact + 1e-12) & (exact - 1e-12 <= est.upper)).all()
    # efficiency of the exact values: they split V(all) − V(∅)
    ends = game.full_values(torch.tensor([[True] * 10, [False] * 10]))
    assert exact.sum().item() == pytest.approx((ends[0] - ends[1]).item(), abs=1e-9)


def test_onnx_and_pt2_give_the_same_game(tiny_cnn):
    a = whole_set_game(tiny_cnn, "pt2", MetricSpec("log_likelihood"))
    b = whole_set_game(tiny_cnn, "onnx", MetricSpec("log_likelihood"))
    masks = torch.rand(16, 10, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.allclose(a.full_values(masks), b.full_values(masks), atol=1e-5)


def test_batches_of_coalitions_equal_one_at_a_time_and_the_split_equals_the_whole(digits_cnn):
    gm = load_model(digits_cnn.pt2)
    layers = select_layers(find_layers(gm), None)
    x = digits_cnn.x[:5]
    cached = build_masked_model(gm, layers, x, cache_prefix=True)
    whole = build_masked_model(gm, layers, x, cache_prefix=False)
    masks = (torch.rand(6, cached.n_players, generator=torch.Generator().manual_seed(1)) > 0.4).float()
    batched = cached(x, masks)
    one_by_one = torch.cat([whole(x, m.unsqueeze(0)) for m in masks])
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_a_removed_neuron_is_silent_after_its_batchnorm_and_relu(digits_cnn):
    """Zeroing conv1's channels gates the output of relu(bn1(conv1)), not conv1 itself."""
    gm = load_model(digits_cnn.pt2)
    layers = select_layers(find_layers(gm), ["conv1"])
    x = digits_cnn.x[:4]
    masked = build_masked_model(gm, layers, x)
    keep = torch.ones(1, 16)
    keep[0, [2, 5]] = 0
    m = digits_cnn.module

    def reference(inp):
        h = F.relu(m.bn1(m.conv1(inp))) * keep.view(1, 16, 1, 1)
        h = F.max_pool2d(F.relu(m.conv2(h)), 2)
        return m.fc2(F.relu(m.fc1(h.reshape(h.size(0), -1))))

    with torch.no_grad():
        assert torch.allclose(masked(x, keep), reference(x), atol=1e-5)


def test_mean_ablation_fills_the_channel_mean_of_the_intact_model(tiny_cnn):
    game = whole_set_game(tiny_cnn, "pt2", MetricSpec("accuracy"), "mean")
    m = tiny_cnn.module
    with torch.no_grad():
        act = F.relu(m.bn1(m.conv1(tiny_cnn.x)))
    gate = next(mod for name, mod in game.model.suffix.named_modules() if name.startswith("gate_") and mod.size == 4)
    assert torch.allclose(gate.fill, act.mean((0, 2, 3)), atol=1e-5)


def test_dead_neurons_get_zero_and_duplicated_neurons_equal_values(tiny_mlp, tmp_path):
    """A network built with known structure: two dead hidden units, two identical ones."""
    from tests.harness.models import TinyMLP, save

    model = TinyMLP()
    model.load_state_dict(tiny_mlp.module.state_dict())
    with torch.no_grad():
        model.fc1.weight[4:].zero_()
        model.fc1.bias[4:] = -1.0  # relu(-1) = 0: units 4 and 5 are dead
        model.fc1.weight[1] = model.fc1.weight[0]
        model.fc1.bias[1] = model.fc1.bias[0]
        model.fc2.weight[:, 1] = model.fc2.weight[:, 0]  # units 0 and 1 are interchangeable
    saved = save(model, tiny_mlp.x, tiny_mlp.y, tmp_path, "structured")
    game = whole_set_game(saved, "pt2", MetricSpec("log_likelihood"), "zero")
    exact = exact_shapley(game.full_values, 10)
    assert exact[4] == exact[5] == 0.0
    assert exact[0].item() == pytest.approx(exact[1].item(), abs=1e-9)
    est = run_tmab(game, TMABConfig(**UNTRUNCATED, max_iterations=200))
    assert est.values[4] == 0.0 and est.values[5] == 0.0  # every sampled marginal is exactly zero
    assert est.lower[0] <= exact[1] <= est.upper[0] and est.lower[1] <= exact[0] <= est.upper[1]


def test_group_metrics_draw_every_group_into_every_batch(tiny_mlp):
    game = NeuronGame(
        load_model(tiny_mlp.pt2), load_data(tiny_mlp.npz), MetricSpec("worst_group_accuracy"), batch_size=8
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        sample = game.sample(gen, 3)
        for lane in range(3):
            assert set(sample.groups[lane].tolist()) == {0, 1}


@pytest.mark.slow
def test_digits_cnn_top10_matches_reference_and_removing_it_hurts_most(small_cnn):
    """The paper's headline at small scale: the bandit's top-10 are truly top, and matter far more."""
    game = NeuronGame(load_model(small_cnn.pt2), load_data(small_cnn.npz), MetricSpec("accuracy"), batch_size=128)
    n = game.n_players
    reference = run_tmab(game, TMABConfig(**UNTRUNCATED, max_iterations=600, seed=100))
    ref = reference.values
    ref_sorted = torch.sort(ref, descending=True).values
    standard_error = reference.std_errors
    assert float(standard_error.max()) < 0.006

    # On the reference's budget (the certified stop at ε = 0.005 takes more: tens of thousands of evaluations)
    est = run_tmab(game, TMABConfig(mode="top", top_k=10, seed=1, max_evaluations=reference.evaluations))
    top = torch.argsort(est.values, descending=True)[:10]
    assert (ref[top] >= ref_sorted[9] - 0.005 - 2 * standard_error[top]).all()
    if est.stop_reason == "converged":
        assert sorted(i for i, s in enumerate(est.status) if s == "top") == sorted(top.tolist())

    k = 5
    full = torch.ones(n, dtype=torch.bool)
    base = game.full_values(full.unsqueeze(0)).item()

    def drop(players) -> float:
        mask = full.clone()
        mask[list(players)] = False
        return base - game.full_values(mask.unsqueeze(0)).item()

    by_value = drop(torch.argsort(est.values, descending=True)[:k].tolist())
    gen = torch.Generator().manual_seed(0)
    by_random = sum(drop(torch.randperm(n, generator=gen)[:k].tolist()) for _ in range(20)) / 20
    by_norm = drop(torch.argsort(relative_weight_norms(game))[:k].tolist())
    assert by_value > 0.3, (by_value, by_random, by_norm)
    assert by_value > 2 * max(by_random, by_norm, 0.01), (by_value, by_random, by_norm)


def test_same_seed_and_resume_on_a_real_network(small_cnn):
    """Sampled batches, truncation and the bandit all replay exactly from a checkpoint."""
    game = NeuronGame(load_model(small_cnn.pt2), load_data(small_cnn.npz), MetricSpec("accuracy"), batch_size=32)
    cfg = TMABConfig(mode="top", top_k=5, max_iterations=60, seed=4)
    whole = run_tmab(game, cfg)
    again = run_tmab(game, cfg)
    assert torch.equal(whole.values, again.values) and whole.status == again.status

    saved: list[bytes] = []
    run_tmab(game, cfg, on_progress=lambda p: saved.append(p.checkpoint()), should_stop=lambda: len(saved) >= 6)
    fresh_game = NeuronGame(load_model(small_cnn.pt2), load_data(small_cnn.npz), MetricSpec("accuracy"), batch_size=32)
    resumed = run_tmab(fresh_game, cfg, resume_from=saved[-1])
    assert torch.equal(resumed.values, whole.values)
    assert torch.equal(resumed.samples, whole.samples)
    assert (resumed.iterations, resumed.evaluations, resumed.rows) == (whole.iterations, whole.evaluations, whole.rows)

"""Budgets bound the whole run, building the game included; thin results say so; progress shows from the first pass.

The estimator on slow synthetic games (its deadline, its per-pass callback), ``neuronshap estimate`` as a
process (wall time against ``--max-seconds``, the stop line, exit 1 without evidence), and the service on both
stacks (a job without evidence fails ``no-evidence``; a job whose rounds are long shows progress and an ETA
before its first round ends).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from examples.digits import export_onnx, save_eval_npz
from tests.harness import stacks
from tests.harness.jobs import submit
from tests.harness.models import seeded
from worker.shapley import MetricSpec, NeuronGame, Progress, TMABConfig, load_data, load_model, run_tmab
from worker.shapley.game import BuildTimeout
from worker.shapley.report import evidence, no_evidence_message
from worker.shapley.tmab import PassProgress


class SlowGame:
    """V(S) = share of players kept; each coalition costs ``seconds``: rounds are long."""

    max_coalitions_per_pass = 64
    rows_per_coalition = 1
    value_range = 1.0

    def __init__(self, n: int, seconds: float) -> None:
        self.n_players, self.seconds = n, seconds

    def sample(self, generator: torch.Generator, lanes: int):
        return None

    def evaluate(self, sample, masks: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds * len(masks))
        return masks.double().mean(1)


ENDLESS = {"mode": "all", "half_width": 1e-6, "truncation": 0.0}


def test_the_estimator_stops_within_a_pass_of_its_deadline_and_reports_every_pass():
    game = SlowGame(200, 0.002)  # a pass of 64 coalitions: 0.13 s; a round of 4 walks: 1.6 s
    passes: list[PassProgress] = []
    rounds: list[Progress] = []
    t = time.monotonic()
    estimate = run_tmab(
        game, TMABConfig(**ENDLESS, max_seconds=2.5), on_pass=passes.append, on_progress=rounds.append, started_at=t
    )
    wall = time.monotonic() - t
    assert estimate.stop_reason == "max_seconds"
    assert wall < 2.5 + 0.3, wall
    assert estimate.iterations == 4 * len(rounds) >= 4  # whole rounds only
    first = passes[0]
    assert first.iterations == 0 and first.evaluations > 0 and first.round_evaluations == first.evaluations
    assert all(b.evaluations > a.evaluations for a, b in zip(passes, passes[1:], strict=False))
    # the first round's passes came before its Progress, the one place a checkpoint is taken
    assert sum(p.iterations == 0 for p in passes) > 1
    assert rounds[0].checkpoint()


def test_time_spent_before_the_estimator_counts_and_an_empty_result_says_so():
    game = SlowGame(50, 0.0)
    estimate = run_tmab(game, TMABConfig(**ENDLESS, max_seconds=1.0), started_at=time.monotonic() - 1.5)
    assert estimate.stop_reason == "max_seconds" and estimate.iterations == 0
    assert estimate.setup_s >= 1.5 and estimate.elapsed_s >= 1.5
    message = no_evidence_message(estimate)
    assert message is not None and "max_seconds" in message and "loading" in message
    assert evidence(estimate) == {"informative_min": 0, "informative_median": 0, "players_without_information": 50}


def test_a_round_longer_than_the_budget_stops_at_the_deadline_not_at_the_round_end():
    game = SlowGame(400, 0.004)  # a round: ~6.4 s
    t = time.monotonic()
    estimate = run_tmab(game, TMABConfig(**ENDLESS, max_seconds=1.0), started_at=t)
    assert time.monotonic() - t < 1.3
    assert estimate.iterations == 0 and estimate.discarded_evaluations > 0
    assert no_evidence_message(estimate) is not None


def neuronshap(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "neuronshap", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    return result, time.monotonic() - t


ENDLESS_OPTIONS = ("--metric", "accuracy", "--mode", "all", "--half-width", "1e-6", "--truncation", "0")


class HeavyCNN(nn.Module):
    """Eight 64-channel convolutions at 64x64: ~2.4 GFLOP an example. With ``--ablation mean`` the build measures
    every channel's mean over the whole evaluation set, so on 1,024 examples the build alone takes minutes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 64, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(64, 64, 3, padding=1) for _ in range(8))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def heavy_cnn(tmp_path_factory) -> tuple[Path, Path]:
    module = seeded(HeavyCNN).eval()
    x = torch.randn(1024, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    directory = tmp_path_factory.mktemp("heavy")
    export_onnx(module, directory / "heavy.onnx", x[:2])
    save_eval_npz(directory / "heavy.npz", x, torch.randint(0, 10, (1024,), generator=torch.Generator().manual_seed(1)))
    return directory / "heavy.onnx", directory / "heavy.npz"


class EstimatedSlowGame(SlowGame):
    """A SlowGame that knows what a coalition costs before running one, as NeuronGame does from its probes."""

    @property
    def seconds_per_row(self) -> float:
        return self.seconds


def test_a_first_pass_that_would_end_past_the_deadline_is_not_started():
    """Without an estimate the first pass (each lane's two ends) is the probe of the cost, and it may itself run
    far past the budget; with the game's estimate it is not started."""
    t = time.monotonic()
    estimate = run_tmab(EstimatedSlowGame(50, 0.5), TMABConfig(**ENDLESS, max_seconds=1.0), started_at=t)
    assert estimate.stop_reason == "max_seconds" and estimate.iterations == 0 and estimate.discarded_evaluations == 0
    assert time.monotonic() - t < 1.0  # 8 ends at 0.5 s each were not run
    blind = run_tmab(SlowGame(50, 0.5), TMABConfig(**ENDLESS, max_seconds=1.0), started_at=time.monotonic())
    assert blind.stop_reason == "max_seconds" and blind.discarded_evaluations == 8  # the probe ran, then stopped


def test_a_neuron_game_on_the_cpu_estimates_a_forward_pass_per_example(tiny_cnn):
    game = NeuronGame(load_model(tiny_cnn.onnx), load_data(tiny_cnn.npz), MetricSpec("accuracy"), device="cpu")
    assert game.seconds_per_row is not None and 0 < game.seconds_per_row < 1


def test_a_build_past_its_deadline_stops_between_two_nodes(tiny_cnn):
    with pytest.raises(BuildTimeout):
        NeuronGame(
            load_model(tiny_cnn.onnx), load_data(tiny_cnn.npz), MetricSpec("accuracy"), deadline=time.monotonic()
        )


@pytest.mark.slow
def test_max_seconds_bounds_the_command_when_building_the_game_alone_would_take_longer(heavy_cnn):
    _, start = neuronshap("--version")  # the interpreter and the command's light imports
    model, data = heavy_cnn
    budget = 12.0  # more than loading takes (~5 s on 2 idle cores), far less than the build (minutes)
    result, wall = neuronshap("estimate", model, data, *ENDLESS_OPTIONS, "--ablation", "mean", "--max-seconds", budget)
    assert result.returncode == 1, result.stderr
    assert wall <= budget + 5.0 + start, (wall, start, result.stderr)  # the acceptance: T + a constant
    assert "neuronshap: stopped: max_seconds" in result.stderr and "while loading and building" in result.stderr
    assert "while the game was being built" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_max_seconds_bounds_the_command_including_load_and_build(digits_cnn):
    _, start = neuronshap("--version")  # the interpreter and the command's light imports
    budget = 15.0  # loading and building the digits CNN take about 6 s of it here
    result, wall = neuronshap("estimate", digits_cnn.onnx, digits_cnn.npz, *ENDLESS_OPTIONS, "--max-seconds", budget)
    assert result.returncode == 0, result.stderr
    assert wall <= budget + 3.0 + start, (wall, start, result.stderr)
    line = [x for x in result.stderr.splitlines() if x.startswith("neuronshap: stopped:")]
    assert len(line) == 1 and "max_seconds" in line[0] and "informative" in line[0]


def test_a_run_without_evidence_exits_1_and_says_so_also_with_json(tiny_cnn):
    result, _ = neuronshap("estimate", tiny_cnn.onnx, tiny_cnn.npz, *ENDLESS_OPTIONS, "--max-seconds", "0.01", "--json")
    assert result.returncode == 1, result.stderr
    assert "neuronshap: stopped: max_seconds" in result.stderr
    assert "neuronshap: error: No neuron got an informative sample" in result.stderr
    assert "--max-seconds" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""  # no placeholder zeros for a pipeline to read as values


def test_the_stop_line_is_printed_with_json_on_success(tiny_cnn):
    result, _ = neuronshap(
        "estimate",
        tiny_cnn.onnx,
        tiny_cnn.npz,
        "--metric",
        "accuracy",
        "--top-k",
        "3",
        "--max-iterations",
        "8",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert "neuronshap: stopped: max_iterations" in result.stderr
    assert "warning:" in result.stderr  # undecided neurons after a budget
    json.loads(result.stdout)


@pytest.fixture(scope="module", params=["embedded", pytest.param("full", marks=pytest.mark.service)])
def stack(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    with getattr(stacks, request.param)(tmp) as s:
        yield s


def test_a_job_without_evidence_fails_no_evidence_naming_the_budget(stack, tiny_cnn):
    spec = {"metric": {"name": "accuracy"}, "estimator": ENDLESS | {"max_seconds": 0.01}}
    job = submit(stack.client, tiny_cnn, spec)
    done = stack.wait(job["id"], ("succeeded", "failed", "cancelled"))
    assert done["state"] == "failed", done
    assert done["error"]["type"] == "no-evidence"
    assert "max_seconds" in done["error"]["detail"] and "informative" in done["error"]["detail"]


@pytest.mark.slow
def test_a_job_with_long_rounds_shows_progress_and_an_eta_before_its_first_round_ends(stack, digits_cnn):
    # All 360 examples per walk, no truncation: a round of 4 walks through 112 neurons takes seconds.
    spec = {"metric": {"name": "accuracy"}, "estimator": ENDLESS | {"max_seconds": 8, "batch_size": 360}}
    job = submit(stack.client, digits_cnn, spec)
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = stack.client.get(f"/v1/jobs/{job['id']}").json()
        if now["state"] not in ("queued", "running"):
            break
        if now["state"] == "running":
            seen.append(now["progress"])
        time.sleep(0.05)
    early = [p for p in seen if p["iterations"] == 0 and p["evaluations"] > 0]
    assert early, seen[:5]
    assert all(p["eta_s"] is not None for p in seen if p["players"]), seen[:5]
    assert now["state"] == "succeeded", now
    summary = now["summary"]
    assert summary["stop_reason"] == "max_seconds" and summary["evidence"]["informative_min"] > 0
    assert summary["setup_s"] > 0 and summary["warnings"]  # undecided neurons at a budget

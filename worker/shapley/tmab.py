"""TMAB-Shapley: truncated Monte Carlo permutation sampling with a multi-armed bandit.

Ghorbani & Zou, "Neuron Shapley", NeurIPS 2020; ``docs/ESTIMATOR.md``
states the method. The estimator plays any :class:`Game` (the neurons of a
model, or a synthetic game in the tests) and knows nothing of models.

Work is done in *rounds*: ``lanes`` permutations walk side by side, each on
its own evaluation batch, and their coalitions share forward passes. Between
rounds the bounds and the active set are updated, the progress callback runs,
and the state is a checkpoint. A run stopped in the middle of a round drops
that round, so a checkpoint always sits at a round boundary and a resumed run
replays exactly what an uninterrupted one would have done. Within a round a
lighter callback (``on_pass``) gets the counters after every forward pass;
it carries no checkpoint.

``max_seconds`` counts from ``started_at`` (the caller's clock when the whole
run began, loading and building included), and passes shrink as the deadline
nears so that no pass starts that would end past it.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import torch

from .bounds import BOUNDS, UNION_CONSTANT, half_widths, union_weight
from .errors import SpecError
from .stats import PlayerStats

__all__ = [
    "Game",
    "TMABConfig",
    "Progress",
    "PassProgress",
    "Estimate",
    "run_tmab",
    "undecided",
    "open_pairs",
    "PairBounds",
    "pair_weight",
    "MODES",
]

MODES = ("top", "bottom", "all")
_CHECKPOINT_VERSION = 1
# A round is a star round (:class:`_Star`) once its 1 + A evaluations per lane are at most this share of what a
# walk cost in the last walk round: stars give up each walk's efficiency (its marginals sum to V(all) − V(∅)) and
# its free truncation zeros, so they must save a fifth of the evaluations to be worth it.
STAR_SHARE = 0.8
# Pair intervals (:func:`undecided`): once at most PAIR_CAP players are undecided, every chosen–unchosen pair they
# leave open gets its own confidence sequence on the difference of the two marginals, sampled on the same star
# coalition and batch. Its width is about √2·s/√n where two separate intervals need 2·s/√n, which is what the
# endgame of a few players on either side of the k-th value spends its time on. PAIR_SHARE of δ goes to the pairs.
PAIR_CAP = 16
PAIR_SHARE = 0.5
# The first PAIR_SLOTS pairs opened share half of the pairs' level evenly (:func:`pair_weight`), the closest first:
# a run opens about a hundred, most far apart, and with a steep schedule the deciding ones came ~80th, at δ' ≈ 7·10⁻⁶.
PAIR_SLOTS = 64


class Game(Protocol):
    """What the estimator needs of a cooperative game.

    The four figures are read-only properties: the estimator only reads them, and a game may compute them
    (:class:`NeuronGame` does) or hold them as plain attributes.
    """

    @property
    def n_players(self) -> int: ...

    @property
    def value_range(self) -> float | None:
        """Width of the metric's range; None if unbounded."""

    @property
    def max_coalitions_per_pass(self) -> int: ...

    @property
    def rows_per_coalition(self) -> int:
        """Examples behind one coalition's value: the unit of forward work."""

    def sample(self, generator: torch.Generator, lanes: int) -> Any:
        """Draw one evaluation batch per lane and precompute what its coalitions share."""

    def evaluate(self, sample: Any, masks: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
        """Values (float64, CPU) of coalitions ``masks`` (``[M, n]`` bool), each on the batch of ``lanes[m]``."""


@dataclass(frozen=True)
class TMABConfig:
    """Settings of one run; the defaults are the ones ``bench/`` led to.

    Args:
        mode: ``top`` (find the ``top_k`` most helpful), ``bottom`` (the most
            harmful) or ``all`` (every value to ``half_width``).
        top_k: how many players ``top``/``bottom`` must separate from the rest.
        delta: error level of all intervals together (union bound).
        epsilon: tolerance of the top-k: at the certified stop every chosen player's value is within
            ``epsilon`` of the true k-th largest (:func:`undecided`), so near-ties are not resolved.
        half_width: target interval half-width for ``mode="all"``.
        bound: ``normal``, ``bernstein`` or ``bernstein_observed`` (:mod:`.bounds`).
        truncation: stop a walk once the value stays within this fraction of
            ``|V(all) − V(∅)|`` of ``V(∅)``; 0 disables truncation (unbiased).
        patience: consecutive evaluated steps within that band before truncating.
        min_samples: no player is decided before this many *informative* samples: marginals its walks really
            measured, not the zeros a walk truncated before reaching it records (:mod:`.stats`).
        lanes: permutations walked side by side, sharing forward passes.
        coalitions_per_pass: cap on coalitions per forward pass (the game also caps it by memory).
        seed: the whole run is a function of it.
        max_iterations, max_evaluations, max_seconds: budgets; a run stops at
            the first reached (evaluation budget checked between rounds). ``max_seconds`` counts from
            :func:`run_tmab`'s ``started_at`` (loading and building included), across resumes.
    """

    mode: str = "top"
    top_k: int = 10
    delta: float = 0.05
    epsilon: float = 0.005
    half_width: float = 0.01
    bound: str = "normal"
    truncation: float = 0.1
    patience: int = 5
    min_samples: int = 10
    lanes: int = 4
    coalitions_per_pass: int = 64
    seed: int = 0
    max_iterations: int | None = None
    max_evaluations: int | None = None
    max_seconds: float | None = None

    def validate(self, n_players: int) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode in ("top", "bottom") and not 1 <= self.top_k < n_players:
            problems.append(
                f"top_k must be between 1 and {n_players - 1} (the game has {n_players} players), not {self.top_k}"
            )
        if not 0.0 < self.delta < 1.0:
            problems.append(f"delta must be in (0, 1), not {self.delta}")
        if self.epsilon < 0.0:
            problems.append(f"epsilon must be 0 or more, not {self.epsilon}")
        if self.half_width <= 0.0:
            problems.append(f"half_width must be positive, not {self.half_width}")
        if self.bound not in BOUNDS:
            problems.append(f"bound must be one of {', '.join(BOUNDS)}, not {self.bound!r}")
        if not 0.0 <= self.truncation < 1.0:
            problems.append(f"truncation must be in [0, 1), not {self.truncation}")
        for name in ("patience", "lanes", "coalitions_per_pass"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.min_samples < 0:
            problems.append(f"min_samples must be 0 or more, not {self.min_samples}")
        for name in ("max_iterations", "max_evaluations", "max_seconds"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be positive when given, not {value}")
        if problems:
            raise SpecError("Invalid estimator settings: " + "; ".join(problems) + ".")


@dataclass
class Estimate:
    """Current (or final) estimates with their bounds."""

    values: torch.Tensor  # float64 [n]
    lower: torch.Tensor
    upper: torch.Tensor
    std_errors: torch.Tensor  # float64 [n]: s/√n, the sampling error of each value (the intervals are wider)
    samples: torch.Tensor  # int64 [n]
    informative: torch.Tensor  # int64 [n]: samples from walks that reached the player before truncating
    status: list[str]  # top | bottom | out | decided | undecided
    iterations: int  # lanes sampled: permutations walked plus star coalitions (:class:`_Star`)
    walks: int  # of those, permutations walked
    evaluations: int
    rows: int  # coalitions × examples run through the model: the forward work
    elapsed_s: float
    v_full: float | None
    v_empty: float | None
    stop_reason: str | None  # converged | max_iterations | max_evaluations | max_seconds | stopped
    config: TMABConfig
    setup_s: float = 0.0  # this session's time before the estimator began (loading, building): within elapsed_s
    discarded_evaluations: int = 0  # evaluations of a round cut short at the stop (not in ``evaluations``)
    pair_intervals: int = 0  # chosen–unchosen pairs given an interval of their own difference (:func:`undecided`)


@dataclass(frozen=True)
class PassProgress:
    """Handed to ``on_pass`` after every forward pass: counters only, cheap to make; no checkpoint.

    ``evaluations``, ``rows`` and ``elapsed_s`` include the round in progress, whose work is lost if the run
    stops before the round ends; ``iterations`` counts whole rounds only.
    """

    iterations: int
    evaluations: int
    rows: int
    elapsed_s: float
    round_evaluations: int
    walks_done: int
    lanes: int
    undecided: int  # active players of the round in progress
    config: TMABConfig


@dataclass
class Progress:
    """Handed to the progress callback after every round: the one place a checkpoint can be taken."""

    estimate: Estimate
    undecided: int
    _state: _State = field(repr=False)

    def checkpoint(self) -> bytes:
        """The run's state at this round boundary; :func:`run_tmab` resumes from it."""
        return self._state.to_bytes()


@dataclass
class _State:
    config: TMABConfig
    stats: PlayerStats
    rng: torch.Tensor
    iterations: int = 0
    evaluations: int = 0
    rows: int = 0
    elapsed_s: float = 0.0
    v_full_sum: float = 0.0
    v_empty_sum: float = 0.0
    ends: int = 0  # walks that valued V(all) and V(∅) (star rounds do not)
    walk_cost: float | None = None  # evaluations per walk in the last walk round, its ends included
    # Pairs (chosen, unchosen when opened) with a confidence sequence of their difference, in the order opened.
    pairs: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 2), dtype=torch.int64))
    pair_stats: PlayerStats = field(default_factory=lambda: PlayerStats.empty(0))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(
            {
                "version": _CHECKPOINT_VERSION,
                "config": asdict(self.config),
                "stats": self.stats.state(),
                "rng": self.rng,
                "counters": [self.iterations, self.evaluations, self.rows],
                "sums": [self.elapsed_s, self.v_full_sum, self.v_empty_sum],
                "walks": [self.ends, self.walk_cost],
                "pairs": {"index": self.pairs, "stats": self.pair_stats.state()},
            },
            buf,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> _State:
        try:
            raw = torch.load(io.BytesIO(data), weights_only=True)
            if raw.get("version") != _CHECKPOINT_VERSION:
                raise ValueError(f"version {raw.get('version')}")
            iterations, evaluations, rows = raw["counters"]
            elapsed, v_full_sum, v_empty_sum = raw["sums"]
            ends, walk_cost = raw.get("walks", [iterations, None])  # older checkpoints: walks only
            pairs = raw.get("pairs")  # older checkpoints: none opened yet
            return cls(
                TMABConfig(**raw["config"]),
                PlayerStats.from_state(raw["stats"]),
                raw["rng"],
                iterations,
                evaluations,
                rows,
                elapsed,
                v_full_sum,
                v_empty_sum,
                ends,
                walk_cost,
                *(() if pairs is None else (pairs["index"], PlayerStats.from_state(pairs["stats"]))),
            )
        except Exception as exc:
            raise SpecError(
                f"The checkpoint cannot be read ({type(exc).__name__}: {exc}); start the run afresh."
            ) from exc


def run_tmab(
    game: Game,
    config: TMABConfig | None = None,
    *,
    resume_from: bytes | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_pass: Callable[[PassProgress], None] | None = None,
    started_at: float | None = None,
) -> Estimate:
    """Estimate the Shapley value of every player of ``game``.

    Args:
        game: the game to play.
        config: settings; ignored when resuming, except for the budgets, which
            the caller may change.
        resume_from: bytes from :meth:`Progress.checkpoint`.
        on_progress: called after every round (throttle inside if it is costly).
        should_stop: polled between forward passes; returning True ends the run
            with the estimates of the last whole round (``stop_reason="stopped"``).
        on_pass: called after every forward pass with the counters so far (:class:`PassProgress`; throttle
            inside); it carries no checkpoint, which exists only at round boundaries (``on_progress``).
        started_at: ``time.monotonic()`` when the caller's run began (before loading the model): the time
            since then counts towards ``elapsed_s`` and ``max_seconds``. Default: now.
    """
    config = config or TMABConfig()
    if resume_from is not None:
        state = _State.from_bytes(resume_from)
        state.config = replace(
            state.config,
            max_iterations=config.max_iterations,
            max_evaluations=config.max_evaluations,
            max_seconds=config.max_seconds,
        )
        if state.stats.count.numel() != game.n_players:
            raise SpecError(
                f"The checkpoint is for {state.stats.count.numel()} players, the game has {game.n_players}."
            )
    else:
        config.validate(game.n_players)
        generator = torch.Generator().manual_seed(config.seed)
        state = _State(config, PlayerStats.empty(game.n_players), generator.get_state())
    return _Runner(game, state, on_progress, should_stop, on_pass, started_at).run()


class _Runner:
    def __init__(self, game: Game, state: _State, on_progress, should_stop, on_pass, started_at) -> None:
        self.game, self.state = game, state
        self.cfg = state.config
        self.on_progress = on_progress
        self.on_pass = on_pass
        self.should_stop = should_stop or (lambda: False)
        self.generator = torch.Generator()
        self.generator.set_state(state.rng)
        t = time.monotonic()
        self.setup_s = max(0.0, t - started_at) if started_at is not None else 0.0
        self.started = t - self.setup_s - state.elapsed_s
        self.per_pass = max(1, min(self.cfg.coalitions_per_pass, game.max_coalitions_per_pass))
        # Measured costs, to start no step that would end past max_seconds' deadline.
        self.coalition_s: float | None = None
        self.sample_s: float | None = None
        self.discarded = 0
        self._time_up = False

    def run(self) -> Estimate:
        active, _ = self._active()
        while True:
            reason = self._budget_reached(active)
            if reason:
                return self._estimate(reason, active)
            undecided = int(active.sum())
            star = self._star_round(undecided)
            # A star round fills its passes with lanes: its 1 + A coalitions per lane are few, and a pass's fixed
            # cost (the interpreter, finding groups) is a third of the endgame's time at 4 lanes.
            lanes = max(self.cfg.lanes, self.per_pass // (1 + undecided)) if star else self.cfg.lanes
            if self.cfg.max_iterations is not None:
                lanes = min(lanes, self.cfg.max_iterations - self.state.iterations)
            if not self._round(lanes, active, star):
                return self._estimate("max_seconds" if self._time_up else "stopped", active)
            active, cells = self._active()
            if cells is not None and int(active.sum()) <= PAIR_CAP:
                self._open_pairs(active, cells)
            if self.on_progress is not None:
                self.on_progress(Progress(self._estimate(None, active), int(active.sum()), self.state))

    def _budget_reached(self, active: torch.Tensor) -> str | None:
        cfg, st = self.cfg, self.state
        if not bool(active.any()):
            return "converged"
        if cfg.max_iterations is not None and st.iterations >= cfg.max_iterations:
            return "max_iterations"
        if cfg.max_evaluations is not None and st.evaluations >= cfg.max_evaluations:
            return "max_evaluations"
        if self._out_of_time():
            return "max_seconds"
        if self.should_stop():
            return "stopped"
        return None

    def _out_of_time(self) -> bool:
        return self.cfg.max_seconds is not None and time.monotonic() - self.started >= self.cfg.max_seconds

    def _time_left(self) -> float:
        assert self.cfg.max_seconds is not None
        return self.cfg.max_seconds - (time.monotonic() - self.started)

    def _pass_cap(self, pending_ends: int) -> int | None:
        """Most coalitions the next pass may hold to end by the deadline; None: no limit; 0: stop now.

        Without a measured cost yet, the game's own estimate of a forward pass per example (``seconds_per_row``,
        if it has one) sizes the first pass, else the first pass is the ends alone (a probe); after that the cost
        per coalition seen so far decides. Only ``max_seconds`` changes a pass's size, and only near its deadline.
        """
        if self.cfg.max_seconds is None:
            return None
        left = self._time_left()
        if left <= 0:
            return 0
        if self.coalition_s is None:
            per_row = getattr(self.game, "seconds_per_row", None)  # a game's own estimate (NeuronGame's probes)
            if per_row is None:
                return pending_ends or 1
            return int(left / (per_row * self.game.rows_per_coalition))
        return int(left / self.coalition_s)

    def _star_round(self, undecided: int) -> bool:
        """Whether the next round samples stars: once 1 + A evaluations per lane are at most ``STAR_SHARE`` of what
        a walk cost in the last walk round (none measured yet: walk)."""
        walk_cost = self.state.walk_cost
        return walk_cost is not None and 1 + undecided <= STAR_SHARE * walk_cost

    def _round(self, lanes: int, active: torch.Tensor, star: bool) -> bool:
        """Walk ``lanes`` permutations, or value ``lanes`` stars; commit their marginals, or return False if
        interrupted."""
        n, cfg = self.game.n_players, self.cfg
        self._time_up = False
        if cfg.max_seconds is not None and self.sample_s is not None and self._time_left() < self.sample_s:
            self._time_up = True  # drawing the round's batches alone would end past the deadline
            return False
        undecided = int(active.sum())
        walks: list[_Walk | _Star]
        if star:
            walks = [_Star(self.generator, active) for _ in range(lanes)]
        else:
            walks = [_Walk(torch.randperm(n, generator=self.generator), active, cfg) for _ in range(lanes)]
        t = time.monotonic()
        sample = self.game.sample(self.generator, lanes)
        self.sample_s = time.monotonic() - t

        # A walk round's first pass also values the full and the empty coalition of every lane.
        ends = torch.stack([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)]).repeat(lanes, 1)
        pending_ends = not star
        evaluations = rows = 0
        while pending_ends or any(not w.done for w in walks):
            if self._out_of_time():
                self._time_up = True
            if self._time_up or self.should_stop():
                self.discarded = evaluations
                return False
            open_walks = [lane for lane, w in enumerate(walks) if not w.done]
            n_ends = 2 * lanes if pending_ends else 0
            cap = self._pass_cap(n_ends)
            room = self.per_pass if cap is None else min(self.per_pass, cap - n_ends)
            if cap is not None and (cap < n_ends or (room <= 0 and not pending_ends)):
                self._time_up = True  # the next pass could not end by the deadline
                self.discarded = evaluations
                return False
            if cap is None or room >= self.per_pass:  # the deadline does not constrain this pass
                counts = [max(1, self.per_pass // max(1, len(open_walks)))] * len(open_walks)
            else:  # near the deadline: no more than ``room`` steps in all, the first walks first
                room = max(0, room)
                share = room // max(1, len(open_walks))
                counts = [share + (1 if i < room - share * len(open_walks) else 0) for i in range(len(open_walks))]
            masks, lane_ids, steps_taken = [], [], []
            if pending_ends:
                masks.append(ends)
                lane_ids.append(torch.arange(lanes).repeat_interleave(2))
            for lane, count in zip(open_walks, counts, strict=True):
                if count == 0:
                    continue
                steps = walks[lane].next_steps(count)
                steps_taken.append((lane, steps))
                masks.append(walks[lane].masks(steps))
                lane_ids.append(torch.full((len(steps),), lane))
            masks_t, lane_t = torch.cat(masks), torch.cat(lane_ids)
            t = time.monotonic()
            values = self.game.evaluate(sample, masks_t, lane_t)
            cost = (time.monotonic() - t) / max(1, len(values))
            self.coalition_s = cost if self.coalition_s is None else max(cost, (self.coalition_s + cost) / 2)
            evaluations += len(values)
            rows += len(values) * self.game.rows_per_coalition
            at = 0
            if pending_ends:
                for lane, w in enumerate(walks):
                    assert isinstance(w, _Walk)
                    w.set_ends(float(values[2 * lane]), float(values[2 * lane + 1]))
                at, pending_ends = 2 * lanes, False
            for lane, steps in steps_taken:
                walks[lane].record(steps, values[at : at + len(steps)])
                at += len(steps)
            if self.on_pass is not None:
                st = self.state
                self.on_pass(
                    PassProgress(
                        iterations=st.iterations,
                        evaluations=st.evaluations + evaluations,
                        rows=st.rows + rows,
                        elapsed_s=time.monotonic() - self.started,
                        round_evaluations=evaluations,
                        walks_done=sum(w.done for w in walks),
                        lanes=lanes,
                        undecided=undecided,
                        config=cfg,
                    )
                )

        st = self.state
        players, marginals, reached = zip(*(w.marginals() for w in walks), strict=True)
        st.stats.add(torch.cat(players), torch.cat(marginals), torch.cat(reached))  # the lanes in order, at once
        pair_columns = self._pair_columns(active) if star else None
        if pair_columns is not None:  # each star's difference of marginals for every pair it sampled both of
            both, a, b = pair_columns
            diffs = torch.cat([m[a] - m[b] for m in marginals])
            st.pair_stats.add(both.repeat(len(walks)), diffs, torch.ones_like(diffs, dtype=torch.bool))
        for w in walks:
            if isinstance(w, _Walk):
                st.v_full_sum += w.v_full
                st.v_empty_sum += w.v_empty
        if not star:
            st.ends += lanes
            st.walk_cost = evaluations / lanes
        st.iterations += lanes
        st.evaluations += evaluations
        st.rows += rows
        st.elapsed_s = time.monotonic() - self.started
        st.rng = self.generator.get_state()
        return True

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stats, cfg = self.state.stats, self.cfg
        mean = stats.mean
        delta = cfg.delta if cfg.mode == "all" else cfg.delta * (1.0 - PAIR_SHARE)
        width = half_widths(stats, cfg.bound, delta, self.game.value_range, cfg.min_samples)
        return mean, mean - width, mean + width

    def _pair_bounds(self) -> PairBounds | None:
        """Bounds of each opened pair's difference (None before any is opened); the m-th pair opened spends
        PAIR_SHARE·δ·:func:`pair_weight` of the error level (summable over however many are opened, so the pairs
        hold together at PAIR_SHARE·δ)."""
        st, cfg = self.state, self.cfg
        if not len(st.pairs):
            return None
        delta_each = cfg.delta * PAIR_SHARE * pair_weight(len(st.pairs))
        value_range = None if self.game.value_range is None else 2.0 * self.game.value_range
        width = half_widths(st.pair_stats, cfg.bound, cfg.delta * PAIR_SHARE, value_range, delta_each=delta_each)
        mean = st.pair_stats.mean
        return PairBounds(st.pairs, mean - width, mean + width)

    def _active(self) -> tuple[torch.Tensor, _Cells | None]:
        """Players still to be sampled (:func:`undecided`), and in ``top``/``bottom`` the open pairs they come
        from (:func:`open_pairs`), which :meth:`_open_pairs` reuses."""
        mean, lower, upper = self._bounds()
        young = self.state.stats.informative < self.cfg.min_samples
        if self.cfg.mode == "all":
            return undecided(mean, lower, upper, young, self.cfg), None
        cells = open_pairs(mean, lower, upper, self.cfg, self._pair_bounds())
        return _short_of_threshold(mean, young, self.cfg, lower, upper, cells), cells

    def _open_pairs(self, active: torch.Tensor, cells: _Cells) -> None:
        """Give every open chosen–unchosen pair of two active players (both sampled by the next star round) that
        has no interval yet one, the closest means first, which takes the larger levels (:func:`pair_weight`): a
        level fixed at opening from the samples so far is sound, since the pair's own samples all come later. A
        pair opened now has no samples, so it leaves ``cells`` and ``active`` as they are."""
        st = self.state
        rows, cols, still_open = cells
        known = {tuple(p) for p in st.pairs.tolist()} | {tuple(p[::-1]) for p in st.pairs.tolist()}
        r, c = torch.nonzero(still_open & active[rows].unsqueeze(1) & active[cols].unsqueeze(0), as_tuple=True)
        new = [p for p in torch.stack([rows[r], cols[c]], 1).tolist() if tuple(p) not in known]
        mean = st.stats.mean
        new.sort(key=lambda p: abs(float(mean[p[0]] - mean[p[1]])))
        if new:
            st.pairs = torch.cat([st.pairs, torch.tensor(new, dtype=torch.int64)])
            st.pair_stats = st.pair_stats.extended(len(new))

    def _pair_columns(self, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(opened pairs whose two players a star round samples, and those players' columns in a star's
        marginals, which list the active players in order), or None if there is no such pair."""
        pairs = self.state.pairs
        column = torch.full((active.numel(),), -1, dtype=torch.int64)
        players = torch.nonzero(active).squeeze(1)
        column[players] = torch.arange(len(players))
        a, b = column[pairs[:, 0]], column[pairs[:, 1]]
        both = torch.nonzero((a >= 0) & (b >= 0)).squeeze(1)
        return (both, a[both], b[both]) if len(both) else None

    def _estimate(self, reason: str | None, active: torch.Tensor) -> Estimate:
        """The estimate at the current state, whose active players (:meth:`_active`) the caller has."""
        st, cfg = self.state, self.cfg
        mean, lower, upper = self._bounds()
        status = ["undecided" if a else "decided" for a in active.tolist()]
        if cfg.mode in ("top", "bottom"):
            order = torch.argsort(mean, descending=cfg.mode == "top", stable=True)
            chosen = set(order[: cfg.top_k].tolist())
            for i in range(len(status)):
                if status[i] == "decided":
                    status[i] = cfg.mode if i in chosen else "out"
        its = st.iterations
        elapsed = st.elapsed_s if reason is None else time.monotonic() - self.started
        return Estimate(
            values=mean,
            lower=lower,
            upper=upper,
            std_errors=torch.sqrt(st.stats.variance / st.stats.count.clamp_min(1)),
            samples=st.stats.count.clone(),
            informative=st.stats.informative.clone(),
            status=status,
            iterations=its,
            walks=st.ends,
            evaluations=st.evaluations,
            rows=st.rows,
            elapsed_s=elapsed,
            v_full=st.v_full_sum / st.ends if st.ends else None,
            v_empty=st.v_empty_sum / st.ends if st.ends else None,
            stop_reason=reason,
            config=cfg,
            setup_s=self.setup_s,
            discarded_evaluations=self.discarded if reason is not None else 0,
            pair_intervals=len(st.pairs),
        )


def pair_weight(count: int) -> torch.Tensor:
    """Share of the pairs' error level spent on each of the first ``count`` pairs opened, in order: half of it
    evenly over the first PAIR_SLOTS, which :meth:`_Runner._open_pairs` gives to the closest pairs, the other
    half over any later ones by :func:`.bounds.union_weight`, scaled by the integral bound on its tail beyond
    PAIR_SLOTS (so each later pair gets less than a first one, and all together at most half)."""
    order = torch.arange(count, dtype=torch.float64)
    late = 0.5 * union_weight(order + 2.0) * UNION_CONSTANT * math.log(PAIR_SLOTS + 1.0)
    return torch.where(order < PAIR_SLOTS, torch.full_like(order, 0.5 / PAIR_SLOTS), late)


@dataclass(frozen=True)
class PairBounds:
    """Pairs with an interval of their own: ``index[m]`` = (a, b) and ``lower[m]`` ≤ φ_a − φ_b ≤ ``upper[m]``."""

    index: torch.Tensor  # int64 [P, 2]
    lower: torch.Tensor  # float64 [P]
    upper: torch.Tensor


def undecided(
    mean: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    young: torch.Tensor,
    cfg: TMABConfig,
    pairs: PairBounds | None = None,
) -> torch.Tensor:
    """Players still to be sampled: ``young`` ones, and of every pair :func:`open_pairs` leaves open, the player
    not yet within ε/2 of its side of the threshold.

    In ``top``/``bottom`` the run stops when no chosen–unchosen pair is open. When the intervals hold, every
    chosen player i is then within ε of the true k-th value: if the chosen set is not the true top k, some
    unchosen j is in it, and φ_i ≥ φ_j − ε ≥ (true k-th value) − ε. Without pair intervals this is the
    ε-optimal subset rule of LUCB (Kalyanakrishnan et al. 2012): the weakest chosen lower bound within ε of the
    strongest unchosen upper bound. ``tests/test_certificate.py`` checks the guarantee on random intervals.
    """
    if cfg.mode == "all":
        return young | ((upper - lower) / 2 > cfg.half_width)
    return _short_of_threshold(mean, young, cfg, lower, upper, open_pairs(mean, lower, upper, cfg, pairs))


_Cells = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # what open_pairs returns: rows, cols, still_open


def _short_of_threshold(
    mean: torch.Tensor, young: torch.Tensor, cfg: TMABConfig, lower: torch.Tensor, upper: torch.Tensor, cells: _Cells
) -> torch.Tensor:
    """``young`` players, and of every open pair the player not yet within ε/2 of its side of θ (at least one of
    the two is: were both, lower_i + ε ≥ upper_j). A pair's own interval grows while both are (the joint
    samples of a star); sampling a player only for a pair costs more than it saves
    (bench/results/certificate.txt)."""
    rows, cols, still_open = cells
    mean, lower, upper = _as_top(cfg, mean, lower, upper)
    theta, margin = _threshold(mean, cfg.top_k), cfg.epsilon / 2.0
    active = young.clone()
    active[rows[(still_open & (lower[rows] + margin < theta).unsqueeze(1)).any(1)]] = True
    active[cols[(still_open & (upper[cols] - margin > theta).unsqueeze(0)).any(0)]] = True
    return active


def _as_top(
    cfg: TMABConfig, mean: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The estimates and bounds of −φ in ``bottom`` mode (the bottom k of φ are the top k of −φ), else as given."""
    return (-mean, -upper, -lower) if cfg.mode == "bottom" else (mean, lower, upper)


def _threshold(mean: torch.Tensor, top_k: int) -> float:
    """Midway between the k-th and the (k+1)-th largest mean: the boundary players of an open pair that has no
    interval of its own are sampled until they are within ε/2 of their side of it. At the (k+1)-th mean itself,
    that player's interval would always contain θ, and it would be done only once its half-width was below ε/2."""
    ordered = torch.sort(mean, descending=True).values
    return float(ordered[top_k - 1] + ordered[top_k]) / 2.0


def open_pairs(
    mean: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, cfg: TMABConfig, pairs: PairBounds | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen players, unchosen players, ``[rows, cols]`` bool): the pairs not yet certified.

    A pair (i chosen, j not) is certified when φ_i ≥ φ_j − ε holds by the players' own intervals
    (lower_i + ε ≥ upper_j) or by the pair's interval of φ_i − φ_j (its lower bound ≥ −ε), whichever of a pair's
    two players is chosen now. Only the chosen players that some unchosen upper bound is above by more than ε,
    and the unchosen players above some chosen lower bound by more than ε, are listed: the matrix stays small at
    thousands of players.
    """
    mean, lower, upper = _as_top(cfg, mean, lower, upper)
    if pairs is not None and cfg.mode == "bottom":
        pairs = PairBounds(pairs.index, -pairs.upper, -pairs.lower)
    eps = cfg.epsilon
    order = torch.argsort(mean, descending=True, stable=True)
    chosen, rest = order[: cfg.top_k], order[cfg.top_k :]
    rows = chosen[lower[chosen] + eps < upper[rest].max()]
    cols = rest[upper[rest] > lower[chosen].min() + eps]
    still_open = lower[rows].unsqueeze(1) + eps < upper[cols].unsqueeze(0)
    if pairs is not None:
        n = mean.numel()
        row_at = torch.full((n,), -1, dtype=torch.int64)
        col_at = torch.full((n,), -1, dtype=torch.int64)
        row_at[rows], col_at[cols] = torch.arange(len(rows)), torch.arange(len(cols))
        a, b = pairs.index[:, 0], pairs.index[:, 1]
        # (a chosen, b not): certified if φ_a − φ_b ≥ −ε; (b chosen, a not): if φ_b − φ_a ≥ −ε, i.e. upper ≤ ε.
        sides = ((row_at[a], col_at[b], pairs.lower >= -eps), (row_at[b], col_at[a], pairs.upper <= eps))
        for r, c, certified in sides:
            hit = (r >= 0) & (c >= 0) & certified
            still_open[r[hit], c[hit]] = False
    return rows, cols, still_open


class _Walk:
    """One permutation's walk from the full coalition down to the empty one.

    Step ``j`` is the coalition without the first ``j`` players of the
    permutation. Only the steps that an active player's marginal needs are
    evaluated; inactive players are removed without a forward pass.
    """

    def __init__(self, perm: torch.Tensor, active: torch.Tensor, cfg: TMABConfig) -> None:
        n = perm.numel()
        self.perm, self.cfg, self.n = perm, cfg, n
        self.rank = torch.empty_like(perm)
        self.rank[perm] = torch.arange(n)
        self.positions = torch.nonzero(active[perm]).squeeze(1) + 1  # steps that remove an active player
        needed = torch.unique(torch.cat([self.positions - 1, self.positions]))
        self.needed = needed[(needed > 0) & (needed < n)]
        self.values = torch.full((n + 1,), float("nan"), dtype=torch.float64)
        self.next = 0
        self.run = 0
        self.truncated_at: int | None = None
        self.v_full = self.v_empty = float("nan")

    @property
    def done(self) -> bool:
        return self.truncated_at is not None or self.next >= len(self.needed)

    def next_steps(self, count: int) -> torch.Tensor:
        steps = self.needed[self.next : self.next + count]
        self.next += len(steps)
        return steps

    def masks(self, steps: torch.Tensor) -> torch.Tensor:
        """The coalitions of ``steps``: step j keeps the players after the first j of the permutation."""
        return self.rank.unsqueeze(0) >= steps.unsqueeze(1)

    def set_ends(self, v_full: float, v_empty: float) -> None:
        self.v_full, self.v_empty = v_full, v_empty
        self.values[0], self.values[self.n] = v_full, v_empty

    def record(self, steps: torch.Tensor, values: torch.Tensor) -> None:
        """Store evaluated steps in order, truncating once the value has sat near V(∅) long enough."""
        band = self.cfg.truncation * abs(self.v_full - self.v_empty)
        for step, value in zip(steps.tolist(), values.tolist(), strict=True):
            if self.truncated_at is not None:
                return  # evaluated in the same pass as the truncation point: not used
            self.values[step] = value
            if self.cfg.truncation > 0:
                self.run = self.run + 1 if abs(value - self.v_empty) <= band else 0
                if self.run >= self.cfg.patience:
                    self.truncated_at = step

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(players, marginal contributions, reached) of this walk's active players; ``reached`` is False where
        the walk was truncated before the player, whose marginal is then 0 by definition (the truncated game)."""
        pos = self.positions
        marg = self.values[pos - 1] - self.values[pos]
        reached = torch.ones_like(pos, dtype=torch.bool) if self.truncated_at is None else pos <= self.truncated_at
        return self.perm[pos - 1], torch.where(reached, marg, torch.zeros_like(marg)), reached


class _Star:
    """One random coalition T and, for every active player j, T with j flipped: a sample of each from 1 + A
    evaluations.

    T's size is uniform on 0…n and T is uniform given its size. For a player j, the coalition before it (T ∖ j
    if j ∈ T, else T) then has a size uniform on 0…n−1 and is uniform given its size, which is the Shapley
    distribution: ``V(T) − V(T ∖ j)`` (j ∈ T) or ``V(T ∪ j) − V(T)`` is an exact, untruncated sample of j's
    marginal, as a permutation's is. A walk pays two evaluations per sample once its active players are
    sparse (V(S ∪ i) and V(S), shared with nothing) and, counting only evaluated steps, seldom truncates then;
    the star pays one, plus T's own.
    """

    def __init__(self, generator: torch.Generator, active: torch.Tensor) -> None:
        n = active.numel()
        size = int(torch.randint(0, n + 1, (1,), generator=generator))
        self.coalition = torch.zeros(n, dtype=torch.bool)
        self.coalition[torch.randperm(n, generator=generator)[:size]] = True
        self.players = torch.nonzero(active).squeeze(1)
        self.values = torch.full((len(self.players) + 1,), float("nan"), dtype=torch.float64)
        self.next = 0

    @property
    def done(self) -> bool:
        return self.next > len(self.players)

    def next_steps(self, count: int) -> torch.Tensor:
        """Step 0 is T itself; step k flips the k-th active player."""
        steps = torch.arange(self.next, min(self.next + count, len(self.players) + 1))
        self.next += len(steps)
        return steps

    def masks(self, steps: torch.Tensor) -> torch.Tensor:
        masks = self.coalition.expand(len(steps), -1).clone()
        flip = steps > 0
        rows, players = torch.nonzero(flip).squeeze(1), self.players[steps[flip] - 1]
        masks[rows, players] = ~masks[rows, players]
        return masks

    def record(self, steps: torch.Tensor, values: torch.Tensor) -> None:
        self.values[steps] = values.to(torch.float64)

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(players, marginal contributions, reached): every sample is measured."""
        flipped, base = self.values[1:], self.values[0]
        marg = torch.where(self.coalition[self.players], base - flipped, flipped - base)
        return self.players, marg, torch.ones_like(self.players, dtype=torch.bool)

"""The check of a result: does removing the neurons ranked highest hurt the metric most?

Shapley values are estimates; this measures what they claim on the whole
evaluation set. The metric after removing the top 1..K neurons by estimated
value should fall faster than after removing K random ones (averaged over a
few random orders), and removing the bottom 1..K should hurt least, or help.
"""

from __future__ import annotations

import torch

from .game import NeuronGame

__all__ = ["ablation_curve"]


@torch.inference_mode()
def ablation_curve(game: NeuronGame, values: torch.Tensor, k: int = 10, random_draws: int = 5, seed: int = 0) -> dict:
    """Metric after removing the top, bottom and random 0..K neurons.

    Args:
        game: the game the values were estimated on.
        values: estimated value of every player.
        k: largest number of neurons removed; capped at half the players, past which every curve
            nears the metric of the empty model and tells nothing apart.
        random_draws: random removal orders averaged for the baseline.
        seed: seed of those orders, so that the check is reproducible.
    """
    n = game.n_players
    k = max(1, min(k, n // 2))
    order = torch.argsort(values.double(), descending=True, stable=True)
    generator = torch.Generator().manual_seed(seed)
    orders = [order, order.flip(0)] + [torch.randperm(n, generator=generator) for _ in range(random_draws)]
    masks = torch.ones(len(orders), k + 1, n, dtype=torch.bool)
    for o, removal in enumerate(orders):
        for j in range(1, k + 1):
            masks[o, j, removal[:j]] = False
    metric = game.full_values(masks.reshape(-1, n)).double().reshape(len(orders), k + 1)
    randoms = metric[2:]
    names = game.player_names()
    return {
        "metric": game.metric.spec.name,
        "k": list(range(k + 1)),
        "top": metric[0].tolist(),
        "bottom": metric[1].tolist(),
        "random": randoms.mean(0).tolist(),
        "random_sd": (randoms.std(0, unbiased=True) if random_draws > 1 else torch.zeros(k + 1)).tolist(),
        "random_draws": random_draws,
        "removed_top": [{"layer": names[i][0], "index": names[i][1]} for i in order[:k].tolist()],
        "removed_bottom": [{"layer": names[i][0], "index": names[i][1]} for i in order.flip(0)[:k].tolist()],
    }

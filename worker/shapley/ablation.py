"""The check of a result: does removing the neurons ranked highest hurt the metric most?

Shapley values are estimates; this measures what they claim on the whole
evaluation set. The metric after removing the top 1..K neurons by estimated
value should fall faster than after removing K random ones (averaged over a
few random orders), and removing the bottom 1..K should hurt least, or help.

Beside them runs the baseline the structured-pruning literature compares
against: removing the K neurons whose weights have the smallest L1 norm (Li et
al., *Pruning Filters for Efficient ConvNets*, 2017). If Shapley's bottom K
hurt less than the K smallest-norm neurons, the ranking beats the usual
heuristic on the user's own model; if not, the result says so too.
"""

from __future__ import annotations

import operator

import torch

from .game import NeuronGame

__all__ = ["ablation_curve", "relative_weight_norms", "weight_norms"]


def weight_norms(game: NeuronGame) -> torch.Tensor:
    """L1 norm of every player's weights, in player order: a conv filter, or a linear unit's weight row.

    Read from the game's own graphs, so the weights are exactly those the game runs (an ONNX Gemm's ``alpha`` or
    a transposed MatMul weight already folded into ``[out, in]`` by the importer).
    """
    found: dict[str, torch.Tensor] = {}
    for gm in (game.model.prefix, game.model.suffix):
        for node in gm.graph.nodes:
            name = node.meta.get("layer")
            if name is None or name in found:
                continue
            weight = node.args[1]
            if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                found[name] = operator.attrgetter(str(weight.target))(gm).detach()
    missing = [layer.name for layer in game.layers if layer.name not in found]
    if missing:  # every layer with players feeds the output, so its node is in one of the two graphs
        raise RuntimeError(f"The game's graphs have no weight for layer(s) {missing}.")
    return torch.cat([found[layer.name].flatten(1).abs().sum(1).double().cpu() for layer in game.layers])


def relative_weight_norms(game: NeuronGame) -> torch.Tensor:
    """Each player's L1 weight norm over the mean of its layer's: the order the weight-norm baseline removes in.

    Raw L1 norms grow with a layer's fan-in (9 weights in a first 3×3 filter, thousands in a linear row), so a
    ranking across layers by raw norm removes a small first layer whole, which no pruning method does. Norms
    relative to the layer's mean compare filters across layers (Torch-Pruning's ``normalizer="mean"`` for global
    pruning; within one layer the order is Li et al.'s smallest-L1 filters).
    """
    norms = weight_norms(game)
    for layer in game.layers:
        block = norms[layer.offset : layer.offset + layer.size]
        block /= block.mean().clamp_min(torch.finfo(block.dtype).tiny)
    return norms


@torch.inference_mode()
def ablation_curve(game: NeuronGame, values: torch.Tensor, k: int = 10, random_draws: int = 5, seed: int = 0) -> dict:
    """Metric after removing the top, bottom, smallest-weight-norm (relative to the layer's) and random 0..K neurons.

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
    by_norm = torch.argsort(relative_weight_norms(game), stable=True)
    generator = torch.Generator().manual_seed(seed)
    orders = [order, order.flip(0), by_norm] + [torch.randperm(n, generator=generator) for _ in range(random_draws)]
    masks = torch.ones(len(orders), k + 1, n, dtype=torch.bool)
    for o, removal in enumerate(orders):
        for j in range(1, k + 1):
            masks[o, j, removal[:j]] = False
    metric = game.full_values(masks.reshape(-1, n)).double().reshape(len(orders), k + 1)
    randoms = metric[3:]
    names = game.player_names()

    def listed(players: torch.Tensor) -> list[dict]:
        return [{"layer": names[i][0], "index": names[i][1]} for i in players[:k].tolist()]

    return {
        "metric": game.metric.spec.name,
        "k": list(range(k + 1)),
        "top": metric[0].tolist(),
        "bottom": metric[1].tolist(),
        "weight_norm": metric[2].tolist(),
        "random": randoms.mean(0).tolist(),
        "random_sd": (randoms.std(0, unbiased=True) if random_draws > 1 else torch.zeros(k + 1)).tolist(),
        "random_draws": random_draws,
        "removed_top": listed(order),
        "removed_bottom": listed(order.flip(0)),
        "removed_weight_norm": listed(by_norm),
    }

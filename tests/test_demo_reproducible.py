"""examples/digits.py builds and trains the same network, bit for bit, on every run: the demo's top 10 rests on it.

``scripts/demo`` trains ``DigitsCNN`` from seed 0 and ranks its neurons with a
seeded estimator, so the same weights must come out of every run; here, the
same process trains twice with the global generator and the thread count
disturbed in between (a short training: the property does not depend on its
length).
"""

from __future__ import annotations

import torch

from examples.digits import build, load_digits_split, portable_kernels, train


def _trained(seed: int = 0) -> dict[str, torch.Tensor]:
    x, y, _, _ = load_digits_split()
    with portable_kernels():
        model = train(build(seed=seed), x[:512], y[:512], epochs=3, seed=seed, reproducible=True)
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_the_digits_network_trains_to_the_same_bits_whatever_the_global_state_and_thread_count():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    mkldnn = torch.backends.mkldnn.enabled
    first = _trained()
    torch.rand(1000)  # the global generator moves on, as other code in the process would move it
    other = 2 if threads == 1 else 1
    torch.set_num_threads(other)
    try:
        second = _trained()
        assert torch.get_num_threads() == other, "train() must give the caller back its thread count"
    finally:
        torch.set_num_threads(threads)
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.backends.mkldnn.enabled == mkldnn

    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"weights differ between two trainings from seed 0: {different}"


def test_the_seed_is_what_the_weights_depend_on():
    first, other = _trained(0), _trained(1)
    assert not torch.equal(first["fc1.weight"], other["fc1.weight"])

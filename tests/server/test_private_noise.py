"""DP noise the coordinator cannot replay: by default a device seeds its noise and Poisson masks from its own
entropy, so the same plan, data and weights give different updates; only a lab plan (`seeded_noise`) repeats,
and its model card says it is not private against the coordinator."""

from __future__ import annotations

import numpy as np
import pytest

from server.fl.client_app import client_seed, noise_seed
from server.fl.data import DigitsPartition
from server.fl.model import initial_weights
from server.fl.privacy import train_private


def _round(seed: int) -> list[np.ndarray]:
    x, y = DigitsPartition(0, 10, 0.5, 0).load()
    result, _ = train_private(
        initial_weights(0),
        x,
        y,
        epochs=1,
        batch_size=32,
        lr=0.1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        history=[],
        seed=seed,
    )
    return result.weights


# Opacus' per-sample gradient hooks on a first layer whose inputs need no gradient: torch's note, harmless here.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_a_device_draws_its_noise_from_its_own_entropy_unless_a_lab_plan_seeds_it() -> None:
    device = [noise_seed(0, 1, "pi-1", seeded=False) for _ in range(2)]
    assert device[0] != device[1] and device[0] != client_seed(0, 1, "pi-1")
    assert noise_seed(0, 1, "pi-1", seeded=True) == client_seed(0, 1, "pi-1")
    first, second = _round(device[0]), _round(device[1])
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))  # nothing to replay
    lab = client_seed(0, 1, "pi-1")
    assert all(np.array_equal(a, b) for a, b in zip(_round(lab), _round(lab), strict=True))  # the lab repeats

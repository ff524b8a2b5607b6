"""The digits network, its weights as numpy arrays (what Flower carries), local training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from server.fl.data import CLASSES, FEATURES

__all__ = ["DigitsNet", "LocalResult", "evaluate", "get_weights", "initial_weights", "set_weights", "train_plain"]

HIDDEN = 32


class DigitsNet(nn.Module):
    """64 -> 32 (ReLU) -> 10 logits. Small enough for a Pi and for per-sample gradients in Opacus."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(FEATURES, HIDDEN)
        self.out = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.out(torch.relu(self.hidden(x)))
        return logits


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The state dict's tensors in order, as float32 numpy arrays. Unwraps Opacus' GradSampleModule first."""
    inner = getattr(model, "_module", model)
    return [t.detach().cpu().numpy().astype(np.float32, copy=True) for t in inner.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    inner = getattr(model, "_module", model)
    keys = list(inner.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"the model has {len(keys)} tensors, {len(weights)} were given")
    inner.load_state_dict(
        {k: torch.from_numpy(np.array(w, dtype=np.float32)) for k, w in zip(keys, weights, strict=True)}
    )


def initial_weights(seed: int) -> list[np.ndarray]:
    torch.manual_seed(seed)
    return get_weights(DigitsNet())


@dataclass(frozen=True)
class LocalResult:
    weights: list[np.ndarray]
    loss: float  # mean training loss over the round's batches
    examples: int
    steps: int


def _batches_loss(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader[Any]
) -> tuple[float, int]:
    criterion = nn.CrossEntropyLoss()
    total, steps = 0.0, 0
    model.train()
    for xb, yb in loader:
        if len(xb) == 0:  # Poisson sampling can draw an empty batch
            continue
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        total += float(loss.item())
        steps += 1
    return total / max(steps, 1), steps


def train_plain(
    weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, lr: float, seed: int
) -> LocalResult:
    """Non-private local SGD (the "no DP" baseline and the bare-Flower benchmark)."""
    torch.manual_seed(seed)
    model = DigitsNet()
    set_weights(model, weights)
    data = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss, steps = 0.0, 0
    for _ in range(epochs):
        epoch_loss, epoch_steps = _batches_loss(model, optimizer, loader)
        loss, steps = loss + epoch_loss, steps + epoch_steps
    return LocalResult(get_weights(model), loss / max(epochs, 1), len(x), steps)


def evaluate(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(loss, accuracy) on the given examples."""
    model = DigitsNet()
    set_weights(model, weights)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(y)).item())
        accuracy = float((logits.argmax(dim=1).numpy() == y).mean())
    return loss, accuracy


def predict_proba(weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    model = DigitsNet()
    set_weights(model, weights)
    model.eval()
    with torch.no_grad():
        out: np.ndarray = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    return out

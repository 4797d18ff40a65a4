"""The worker-oriented `Trainer` interface every client node drives.

A trainer owns a node's local data and model code. Nodes hand it the global
weights and the round's training config and get back new weights, the number
of examples they came from, and metrics; evaluation likewise. Weights are an
ordered mapping of names to numpy arrays (torch tensors are converted by the
torch trainer), so the rest of fedbus never sees a framework type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from fedbus.errors import ConfigError

__all__ = ["EvalResult", "FitConfig", "FitResult", "NamedArrays", "Trainer"]

NamedArrays = dict[str, npt.NDArray[Any]]
"""Model weights: name -> numpy array, in model order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FitConfig:
    """What the server asks of one local training run.

    Attributes:
        epochs: local epochs (E).
        batch_size: minibatch size (B).
        lr: learning rate.
        mu: FedProx proximal coefficient; 0 is plain FedAvg.
        seed: seeds the shuffling of this run (the round and node make it unique).
        correction: a constant added to every gradient step, by tensor name
            (SCAFFOLD's c - c_i, `fedbus.aggregation.scaffold`); None for none.
    """

    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    mu: float = 0.0
    seed: int = 0
    correction: Mapping[str, npt.NDArray[Any]] | None = None

    def __post_init__(self) -> None:
        # Checked here so a bad ``training:`` value fails at configuration time,
        # not halfway through a round on some remote node.
        if self.epochs < 0:
            raise ConfigError(f"must be >= 0, got {self.epochs}", path="training.epochs")
        if self.batch_size < 1:
            raise ConfigError(f"must be >= 1, got {self.batch_size}", path="training.batch_size")
        if not self.lr > 0:
            raise ConfigError(f"must be > 0, got {self.lr}", path="training.lr")
        if not self.mu >= 0:
            raise ConfigError(f"must be >= 0, got {self.mu}", path="training.mu")


@dataclass(frozen=True, slots=True, kw_only=True)
class FitResult:
    """The outcome of local training.

    Attributes:
        weights: the new local weights (``is_delta`` False) or their
            difference to the weights received (``is_delta`` True).
        num_examples: examples trained on (the aggregation weight).
        metrics: e.g. training loss.
    """

    weights: Mapping[str, npt.NDArray[Any]]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    is_delta: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalResult:
    """Loss and accuracy of some weights on some data."""

    loss: float
    accuracy: float
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Trainer(Protocol):
    """Local training and evaluation on one node's data."""

    def initial_weights(self, seed: int) -> NamedArrays:
        """Fresh model weights, deterministic for ``seed``."""
        ...

    def fit(self, weights: Mapping[str, np.ndarray[Any, Any]], config: FitConfig) -> FitResult:
        """Train locally, starting from ``weights``."""
        ...

    def evaluate(self, weights: Mapping[str, np.ndarray[Any, Any]]) -> EvalResult:
        """Evaluate ``weights`` on this trainer's evaluation data."""
        ...

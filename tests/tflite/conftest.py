"""Fixtures for the TFLite tests: digits splits, trained models, a runtime guard.

Tests that run an interpreter use the ``litert`` fixture, which skips with
the reason when ai-edge-litert is missing (it is in the dev extra, so CI runs
them); the pure-numpy tests (layouts, quantization, manifests) always run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedbus.learning.data import Dataset, load_digits
from fedbus.learning.trainer import FitConfig, NamedArrays

NEEDS_LITERT = "ai-edge-litert is not installed (pip install 'fedbus[tflite]', in the dev extra)"


@pytest.fixture
def litert() -> None:
    """Skip unless ai-edge-litert (runtime and schema module) is importable."""
    pytest.importorskip("ai_edge_litert.interpreter", reason=NEEDS_LITERT)


@pytest.fixture(scope="session")
def digits_split() -> tuple[Dataset, Dataset]:
    """Digits shuffled with a fixed seed: 1,437 training and 360 test examples."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data))
    return data.subset(order[:1437]), data.subset(order[1437:])


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> NamedArrays:
    """Fresh weights at a trained model's scale (logits of order 1), nonzero biases.

    The scale matters for the 1e-5 bound: float32 rounding is relative, so
    logits in the tens would be off by 1e-5 in any two correct implementations.
    """
    rng = np.random.default_rng(seed)
    out: NamedArrays = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            std = 0.1
        else:  # dense [in, out]; torch [out, in, ...]
            fan_in = shape[0] if name.startswith("dense") else int(np.prod(shape[1:]))
            std = float(np.sqrt(2.0 / fan_in))
        out[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return out


def train_numpy(hidden: tuple[int, ...], train: Dataset, epochs: int = 15) -> NamedArrays:
    """A DenseNetwork trained on ``train`` with the framework's own trainer."""
    from fedbus.learning.numpy_models import DenseNetwork
    from fedbus.learning.trainers import NumpyTrainer

    trainer = NumpyTrainer(DenseNetwork(train.num_features, 10, hidden), train)
    config = FitConfig(epochs=epochs, batch_size=16, lr=0.05, seed=1)
    return dict(trainer.fit(trainer.initial_weights(0), config).weights)


def numpy_logits(weights: dict[str, Any], x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The numpy framework's forward pass (DenseNetwork.logits) for dense weights."""
    from fedbus.learning.numpy_models import DenseNetwork

    layers = len(weights) // 2
    sizes = [weights["dense0.w"].shape[0]] + [
        weights[f"dense{i}.w"].shape[1] for i in range(layers)
    ]
    net = DenseNetwork(sizes[0], sizes[-1], tuple(sizes[1:-1]))
    params = [np.asarray(weights[n], np.float32) for n in net.names]
    return net.logits(params, np.asarray(x, np.float32))

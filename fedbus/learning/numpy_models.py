"""Small numpy models: multinomial logistic regression and a ReLU MLP.

Both are a `DenseNetwork`: a stack of dense layers with ReLU between them and
softmax cross-entropy on top; logistic regression is the stack with no hidden
layer. Parameters are a flat list in a fixed order, named ``dense<i>.w``
(shape ``[in, out]``, so a layer is ``x @ w + b``) and ``dense<i>.b``.

Everything is vectorised over the minibatch and runs in the dtype of the
parameters and inputs: float32 in training (weights travel as float32), and
float64 when a test checks gradients against finite differences.

Initialisation is deterministic for a seed: hidden layers use He-normal
(std ``sqrt(2 / fan_in)``, suited to ReLU), the output layer Glorot-uniform
(limit ``sqrt(6 / (fan_in + fan_out))``), biases start at zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.learning.trainer import NamedArrays

__all__ = ["DenseNetwork", "logistic_regression", "mlp"]

Array = npt.NDArray[Any]


class DenseNetwork:
    """A fully connected network with ReLU hidden layers and a softmax output.

    Args:
        num_features: input width (flattened features).
        num_classes: output width.
        hidden: hidden layer widths; empty for logistic regression.
    """

    def __init__(self, num_features: int, num_classes: int, hidden: Sequence[int] = ()) -> None:
        if num_features < 1 or num_classes < 2 or any(h < 1 for h in hidden):
            raise ValueError(
                f"bad layer sizes: features={num_features}, hidden={list(hidden)}, classes={num_classes}"
            )
        self.sizes = (num_features, *hidden, num_classes)
        self.names = tuple(f"dense{i}.{p}" for i in range(len(self.sizes) - 1) for p in ("w", "b"))

    @property
    def num_layers(self) -> int:
        """Dense layers, hidden ones and the output."""
        return len(self.sizes) - 1

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each parameter's shape, in order."""
        out: dict[str, tuple[int, ...]] = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:], strict=True)):
            out[f"dense{i}.w"] = (fan_in, fan_out)
            out[f"dense{i}.b"] = (fan_out,)
        return out

    def init(self, seed: int) -> NamedArrays:
        """Fresh float32 parameters, the same for the same seed."""
        rng = np.random.default_rng(seed)
        params: NamedArrays = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:], strict=True)):
            if i < self.num_layers - 1:
                w = rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out))
            else:
                limit = np.sqrt(6.0 / (fan_in + fan_out))
                w = rng.uniform(-limit, limit, (fan_in, fan_out))
            params[f"dense{i}.w"] = w.astype(np.float32)
            params[f"dense{i}.b"] = np.zeros(fan_out, np.float32)
        return params

    def logits(self, params: Sequence[Array], x: Array) -> Array:
        """Class scores ``[n, num_classes]`` for a batch ``[n, num_features]``."""
        a = x
        last = self.num_layers - 1
        for i in range(self.num_layers):
            a = a @ params[2 * i] + params[2 * i + 1]
            if i < last:
                np.maximum(a, 0, out=a)
        return a

    def loss_and_grads(
        self, params: Sequence[Array], x: Array, y: npt.NDArray[np.int64]
    ) -> tuple[float, list[Array]]:
        """Mean softmax cross-entropy over the batch and its gradients.

        Args:
            params: parameters in `names` order.
            x: a batch ``[n, num_features]`` (n >= 1).
            y: its labels ``[n]``.

        Returns:
            The loss and one gradient per parameter, in order.
        """
        # Forward, keeping each layer's input; a hidden activation > 0 is its ReLU mask.
        inputs = [x]
        a = x
        last = self.num_layers - 1
        for i in range(self.num_layers):
            a = a @ params[2 * i] + params[2 * i + 1]
            if i < last:
                np.maximum(a, 0, out=a)
                inputs.append(a)
        rows = np.arange(len(y))
        z = a - a.max(axis=1, keepdims=True)
        np.exp(z, out=a)  # a's logits are no longer needed: reuse it for probabilities
        total = a.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(total[:, 0]) - z[rows, y]))
        delta = a / total
        delta[rows, y] -= 1.0
        delta /= len(y)
        grads: list[Array] = [np.empty(0)] * len(params)
        for i in range(last, -1, -1):
            grads[2 * i] = inputs[i].T @ delta
            grads[2 * i + 1] = delta.sum(axis=0)
            if i > 0:
                delta = delta @ params[2 * i].T
                delta *= inputs[i] > 0
        return loss, grads

    def loss_and_correct(
        self, params: Sequence[Array], x: Array, y: npt.NDArray[np.int64]
    ) -> tuple[float, int]:
        """Summed cross-entropy and number of correct predictions on a batch."""
        logits = self.logits(params, x)
        z = logits - logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        loss_sum = float(np.sum(lse - z[np.arange(len(y)), y], dtype=np.float64))
        correct = int(np.count_nonzero(np.argmax(logits, axis=1) == y))
        return loss_sum, correct


def logistic_regression(num_features: int, num_classes: int) -> DenseNetwork:
    """Multinomial logistic regression (one dense layer, softmax)."""
    return DenseNetwork(num_features, num_classes)


def mlp(num_features: int, num_classes: int, hidden: Sequence[int] = (32,)) -> DenseNetwork:
    """A ReLU multi-layer perceptron with the given hidden widths."""
    if not hidden:
        raise ValueError("an MLP needs at least one hidden layer; use logistic_regression")
    return DenseNetwork(num_features, num_classes, hidden)

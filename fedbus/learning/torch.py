"""Torch training for any ``nn.Module``, and the ``cnn`` model for digits.

The only fedbus module that imports torch (an extra: ``fedbus[torch]``);
`fedbus.learning.trainers.make_trainer` imports it only when a topology asks
for a torch model. Weights cross the boundary as the module's ``state_dict``
in its order, names unchanged, as numpy arrays:

* in, ``fit``/``evaluate`` copy each array once into a fresh tensor and
  *assign* it to the module (``load_state_dict(assign=True)``), so training
  never writes into the caller's global weights;
* out, the returned arrays are views of those tensors (no copy); the next call
  assigns new tensors again, so arrays already handed out never change.

SGD has the numpy trainer's semantics: per-epoch order from
``numpy.random.default_rng(config.seed)``, batches of ``batch_size``, step
``lr * (grad + mu * (w - w_global) + correction)`` on every trainable parameter, mean
cross-entropy over the batch. ``torch.manual_seed(config.seed)`` is set inside
a forked RNG state (dropout and the like are reproducible; the caller's torch
RNG is left alone).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedbus.learning.data import Dataset
from fedbus.learning.trainer import EvalResult, FitConfig, FitResult, NamedArrays

__all__ = ["DigitsCNN", "TorchTrainer", "cnn", "state_to_arrays"]

_EVAL_BATCH = 2048


def state_to_arrays(module: nn.Module) -> NamedArrays:
    """The module's ``state_dict`` as numpy arrays sharing its memory (CPU tensors)."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def _as_tensor(data: np.ndarray[Any, Any]) -> torch.Tensor:
    # from_numpy shares memory but warns on read-only arrays (digits is cached read-only).
    return torch.from_numpy(data) if data.flags.writeable else torch.tensor(data)


class TorchTrainer:
    """Trains any ``nn.Module`` that maps a batch of ``x`` to class logits.

    Subclass and override `loss` or `sgd_step` to customise training.

    Args:
        module_factory: builds the model; called under ``torch.manual_seed``
            for `initial_weights`, so its initialisation is reproducible.
        train: training data (None on an evaluation-only node).
        eval: evaluation data (None: the training data).
        num_threads: ``torch.set_num_threads`` value, process-wide; 1 by
            default because simulated nodes share a few cores with the broker
            and each other. None leaves torch's setting alone.
    """

    def __init__(
        self,
        module_factory: Callable[[], nn.Module],
        train: Dataset | None,
        eval: Dataset | None = None,
        *,
        num_threads: int | None = 1,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.module_factory = module_factory
        self.module = module_factory()
        self.train = train
        self.eval = eval
        self._template = {k: (v.shape, v.dtype) for k, v in self.module.state_dict().items()}
        self._correction: list[torch.Tensor] | None = None  # SCAFFOLD's c - c_i, during fit

    def initial_weights(self, seed: int) -> NamedArrays:
        """A fresh module's weights, built under ``torch.manual_seed(seed)``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return state_to_arrays(self.module_factory())

    def _load(self, weights: Mapping[str, Any]) -> None:
        if set(weights) != set(self._template):
            raise ValueError(
                f"weights do not fit the model: expected {list(self._template)}, got {list(weights)}"
            )
        state = {}
        for name, (shape, dtype) in self._template.items():
            tensor = torch.from_numpy(np.array(weights[name], copy=True)).to(dtype)
            if tensor.shape != shape:
                raise ValueError(
                    f"{name}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}"
                )
            state[name] = tensor
        self.module.load_state_dict(state, assign=True)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of logits ``outputs`` against integer ``targets``."""
        return F.cross_entropy(outputs, targets)

    def fit(self, weights: Mapping[str, np.ndarray[Any, Any]], config: FitConfig) -> FitResult:
        """Run ``config.epochs`` epochs of SGD from ``weights`` (module docstring).

        Raises:
            RuntimeError: the trainer has no training data.
            ValueError: ``weights`` do not fit the model.
        """
        if self.train is None:
            raise RuntimeError("this trainer has no training data")
        self._load(weights)
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        anchor = None
        if config.mu > 0:
            anchor = [torch.as_tensor(np.asarray(weights[n])).to(p.dtype) for n, p in named]
        params = [p for _, p in named]
        self._correction = None
        if config.correction is not None:
            corr = config.correction
            self._correction = [torch.as_tensor(np.asarray(corr[n])).to(p.dtype) for n, p in named]
        x, y = _as_tensor(self.train.x), _as_tensor(self.train.y)
        n = len(self.train)
        rng = np.random.default_rng(config.seed)
        epoch_loss = 0.0
        self.module.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            for _ in range(config.epochs):
                order = torch.from_numpy(rng.permutation(n))
                xs, ys = x[order], y[order]
                epoch_loss = 0.0
                for start in range(0, n, config.batch_size):
                    xb = xs[start : start + config.batch_size]
                    yb = ys[start : start + config.batch_size]
                    epoch_loss += self.sgd_step(params, anchor, xb, yb, config) * len(yb)
        metrics = {"train_loss": epoch_loss / n} if n and config.epochs else {}
        return FitResult(weights=state_to_arrays(self.module), num_examples=n, metrics=metrics)

    def sgd_step(
        self,
        params: list[nn.Parameter],
        anchor: list[torch.Tensor] | None,
        xb: torch.Tensor,
        yb: torch.Tensor,
        config: FitConfig,
    ) -> float:
        """One SGD step on a minibatch; returns its loss."""
        for p in params:
            p.grad = None
        loss = self.loss(self.module(xb), yb)
        loss.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            for i, p in enumerate(params):
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if anchor is not None:
                    grad = grad + config.mu * (p - anchor[i])
                if self._correction is not None:
                    grad = grad + self._correction[i]
                p.sub_(grad, alpha=config.lr)
        return float(loss.item())

    def evaluate(self, weights: Mapping[str, np.ndarray[Any, Any]]) -> EvalResult:
        """Mean cross-entropy and accuracy on the evaluation data (0s when empty)."""
        data = self.eval if self.eval is not None else self.train
        if data is None:
            raise RuntimeError("this trainer has no data to evaluate on")
        self._load(weights)
        self.module.eval()
        x, y = _as_tensor(data.x), _as_tensor(data.y)
        loss_sum, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(data), _EVAL_BATCH):
                out = self.module(x[start : start + _EVAL_BATCH])
                yb = y[start : start + _EVAL_BATCH]
                loss_sum += float(F.cross_entropy(out, yb, reduction="sum").item())
                correct += int((out.argmax(dim=1) == yb).sum().item())
        n = len(data)
        if n == 0:
            return EvalResult(loss=0.0, accuracy=0.0, num_examples=0)
        return EvalResult(loss=loss_sum / n, accuracy=correct / n, num_examples=n)


class DigitsCNN(nn.Module):
    """Two 3x3 conv + max-pool blocks and a linear classifier, for small images.

    Takes flat features (as every fedbus `Dataset` may hold them) or images,
    and views them as ``image_shape``. On 8x8 digits: 16 and 32 channels,
    6,090 parameters.
    """

    def __init__(
        self, image_shape: tuple[int, int, int] = (1, 8, 8), num_classes: int = 10
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        self.image_shape = image_shape
        self.conv1 = nn.Conv2d(c, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * (h // 4) * (w // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, num_classes]``."""
        x = x.reshape(x.shape[0], *self.image_shape)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))  # type: ignore[no-any-return]


def cnn(image_shape: tuple[int, int, int] = (1, 8, 8), num_classes: int = 10) -> nn.Module:
    """The ``model: cnn`` network for images of ``image_shape`` (channels first)."""
    if image_shape[1] < 4 or image_shape[2] < 4:
        raise ValueError(f"cnn needs images of at least 4x4, got {image_shape}")
    return DigitsCNN(image_shape, num_classes)

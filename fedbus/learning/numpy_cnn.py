"""``model: cnn`` on a board without torch: the frozen conv part in numpy, the head trained.

A board where torch does not install (armv7l, or a 512 MiB board where it
would not fit once imported) can still take part in a ``cnn`` federation:
`NumpyHeadTrainer` computes `fedbus.learning.torch.DigitsCNN`'s convolutional
feature extractor in numpy from the global model it received (frozen: it
never changes it), then trains only the dense classifier (``fc``) on those
features with the numpy trainer (`NumpyTrainer`, the same minibatch SGD,
FedProx and SCAFFOLD terms as everywhere else). Its update carries the conv
tensors exactly as received, so under FedAvg the board pulls the conv layers
towards the global model by its share and improves the head like any other
client; the torch clients keep training the convolutions.

The numpy forward pass is the torch one (a test checks it within 1e-5):
``conv 3x3 padding 1 -> ReLU -> max-pool 2x2 (floor)`` twice, a flatten in
(C, H, W) order, then ``x @ fc.weight.T + fc.bias``. The convolutions are
one matrix product each over 3x3 patches (im2col through
`numpy.lib.stride_tricks.sliding_window_view`); on 8x8 digits a few hundred
examples take milliseconds, and features are computed once per `fit`.

`make_trainer` picks this trainer for ``model: cnn`` when torch cannot be
imported (logging why), or when asked to (``trainer="numpy-head"``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedbus.learning.data import Dataset
from fedbus.learning.numpy_models import DenseNetwork
from fedbus.learning.trainer import EvalResult, FitConfig, FitResult, NamedArrays
from fedbus.learning.trainers import NumpyTrainer

__all__ = ["CONV_CHANNELS", "HEAD", "NumpyHeadTrainer", "cnn_features", "cnn_logits"]

log = logging.getLogger(__name__)

CONV_CHANNELS: Final = (16, 32)
"""DigitsCNN's conv widths (a test checks they agree with `fedbus.learning.torch`)."""

HEAD: Final = ("fc.weight", "fc.bias")
"""The tensors a `NumpyHeadTrainer` trains; every other one is frozen."""

_FROZEN: Final = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")
_EVAL_BATCH = 2048

F32 = npt.NDArray[np.float32]


def _conv3x3_relu(x: F32, weight: F32, bias: F32) -> F32:
    """``relu(conv2d(x, weight, bias, padding=1))`` for ``x`` ``[n, c, h, w]`` (OIHW weights)."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    # [n, c, h, w, 3, 3] -> [n, h, w, c, 3, 3]: one row per output pixel, in OIHW's (c, kh, kw).
    cols = patches.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * 9)
    out = cols @ weight.reshape(weight.shape[0], c * 9).T
    out += bias
    np.maximum(out, 0, out=out)
    return np.ascontiguousarray(out.reshape(n, h, w, -1).transpose(0, 3, 1, 2))


def _max_pool2(x: F32) -> F32:
    """2x2 max-pooling with stride 2, dropping an odd last row/column (torch's floor mode)."""
    h2, w2 = x.shape[2] // 2, x.shape[3] // 2
    rows = (slice(0, 2 * h2, 2), slice(1, 2 * h2, 2))
    cols = (slice(0, 2 * w2, 2), slice(1, 2 * w2, 2))
    # The maximum of four strided views: much faster than max over reshaped axes.
    top = np.maximum(x[:, :, rows[0], cols[0]], x[:, :, rows[0], cols[1]])
    bottom = np.maximum(x[:, :, rows[1], cols[0]], x[:, :, rows[1], cols[1]])
    out: F32 = np.maximum(top, bottom, out=top)
    return out


def cnn_features(
    weights: Mapping[str, Any], x: npt.ArrayLike, image_shape: tuple[int, int, int]
) -> F32:
    """DigitsCNN's flattened conv features ``[n, c2 * (h // 4) * (w // 4)]``, in float32.

    Args:
        weights: at least the conv tensors (``conv1.weight`` ... ``conv2.bias``).
        x: a batch, flat ``[n, c*h*w]`` or images ``[n, c, h, w]``.
        image_shape: ``(c, h, w)``.
    """
    arr = np.asarray(x, dtype=np.float32)
    a = arr.reshape(arr.shape[0], *image_shape)
    for i in (1, 2):
        w = np.asarray(weights[f"conv{i}.weight"], dtype=np.float32)
        b = np.asarray(weights[f"conv{i}.bias"], dtype=np.float32)
        a = _max_pool2(_conv3x3_relu(a, w, b))
    return a.reshape(a.shape[0], -1)


def cnn_logits(
    weights: Mapping[str, Any], x: npt.ArrayLike, image_shape: tuple[int, int, int]
) -> F32:
    """DigitsCNN's logits ``[n, num_classes]``, computed in numpy."""
    features = cnn_features(weights, x, image_shape)
    fc_w = np.asarray(weights["fc.weight"], dtype=np.float32)
    out: F32 = features @ fc_w.T + np.asarray(weights["fc.bias"], dtype=np.float32)
    return out


class NumpyHeadTrainer:
    """Trains only DigitsCNN's classifier, in numpy, on frozen conv features (module docstring).

    Args:
        image_shape: the input ``(c, h, w)``.
        num_classes: output width.
        train: this node's training data (None: evaluation only).
        eval: data `evaluate` scores (None: the training data).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        train: Dataset | None,
        eval: Dataset | None = None,
    ) -> None:
        c, h, w = image_shape
        if h < 4 or w < 4:
            raise ValueError(f"cnn needs images of at least 4x4, got {image_shape}")
        self.image_shape = image_shape
        self.num_classes = num_classes
        self.train = train
        self.eval = eval
        c1, c2 = CONV_CHANNELS
        self.num_features = c2 * (h // 4) * (w // 4)
        self.shapes: dict[str, tuple[int, ...]] = {
            "conv1.weight": (c1, c, 3, 3),
            "conv1.bias": (c1,),
            "conv2.weight": (c2, c1, 3, 3),
            "conv2.bias": (c2,),
            "fc.weight": (num_classes, self.num_features),
            "fc.bias": (num_classes,),
        }
        self.head = DenseNetwork(self.num_features, num_classes)

    def initial_weights(self, seed: int) -> NamedArrays:
        """Fresh weights drawn like torch's defaults (uniform, bound ``1/sqrt(fan_in)``).

        Deterministic for ``seed`` but not the same numbers torch draws: a
        federation's initial model comes from its server, so a board only
        needs these when it runs alone.
        """
        rng = np.random.default_rng(seed)
        out: NamedArrays = {}
        for name, shape in self.shapes.items():
            weight_shape = self.shapes[name.replace(".bias", ".weight")]
            bound = 1.0 / np.sqrt(np.prod(weight_shape[1:]))
            out[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
        return out

    def _check(self, weights: Mapping[str, Any]) -> None:
        if set(weights) != set(self.shapes):
            raise ValueError(
                f"weights do not fit the model: expected {list(self.shapes)}, got {list(weights)}"
            )
        for name, shape in self.shapes.items():
            got = tuple(np.shape(weights[name]))
            if got != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {got}")

    def _features(self, weights: Mapping[str, Any], data: Dataset) -> Dataset:
        feats = np.concatenate(
            [
                cnn_features(weights, data.x[s : s + _EVAL_BATCH], self.image_shape)
                for s in range(0, len(data), _EVAL_BATCH)
            ]
            or [np.zeros((0, self.num_features), np.float32)]
        )
        return Dataset(feats, data.y, data.num_classes)

    @staticmethod
    def _to_head(tensors: Mapping[str, Any]) -> NamedArrays:
        """``fc.*`` (torch's ``[out, in]``) as the dense head's ``dense0.*`` (``[in, out]``)."""
        return {
            "dense0.w": np.asarray(tensors["fc.weight"], dtype=np.float32).T,
            "dense0.b": np.asarray(tensors["fc.bias"], dtype=np.float32),
        }

    def fit(self, weights: Mapping[str, np.ndarray[Any, Any]], config: FitConfig) -> FitResult:
        """Train the head for ``config.epochs`` epochs on features of the frozen conv part.

        Returns:
            Every tensor: the conv ones as received (copies), ``fc.*`` trained.

        Raises:
            RuntimeError: the trainer has no training data.
            ValueError: ``weights`` do not fit the model.
        """
        if self.train is None:
            raise RuntimeError("this trainer has no training data")
        self._check(weights)
        features = self._features(weights, self.train)
        correction = None
        if config.correction is not None:  # SCAFFOLD: only the head's part applies
            correction = self._to_head(config.correction)
        head_config = FitConfig(
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            mu=config.mu,
            seed=config.seed,
            correction=correction,
        )
        result = NumpyTrainer(self.head, features).fit(self._to_head(weights), head_config)
        out: NamedArrays = {n: np.array(weights[n], dtype=np.float32) for n in _FROZEN}
        out["fc.weight"] = np.ascontiguousarray(result.weights["dense0.w"].T)
        out["fc.bias"] = np.asarray(result.weights["dense0.b"])
        return FitResult(
            weights={n: out[n] for n in self.shapes},
            num_examples=result.num_examples,
            metrics=result.metrics,
        )

    def evaluate(self, weights: Mapping[str, np.ndarray[Any, Any]]) -> EvalResult:
        """Mean cross-entropy and accuracy of the whole network, in numpy (0s when empty)."""
        data = self.eval if self.eval is not None else self.train
        if data is None:
            raise RuntimeError("this trainer has no data to evaluate on")
        self._check(weights)
        features = self._features(weights, data)
        return NumpyTrainer(self.head, None, features).evaluate(self._to_head(weights))

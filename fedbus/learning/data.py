"""Datasets: scikit-learn's digits, ``.npz`` files, and LEAF/FedProx Synthetic.

Every loader returns a `Dataset`: float32 features, int64 labels in
``[0, num_classes)``. Nothing is downloaded: digits ships inside scikit-learn
(imported lazily, only when digits is asked for, since it is an extra) and
Synthetic is generated from a seed.

Synthetic(alpha, beta) follows the generator of Li et al., "Federated
Optimization in Heterogeneous Networks" (FedProx), as published with LEAF.
For device i, in 60 dimensions with 10 classes::

    n_i  = floor(lognormal(4, 2)) + 50           (or samples_per_client)
    u_i ~ N(0, alpha)      B_i ~ N(0, beta)      v_i ~ N(B_i, 1)   (each of 60 coordinates)
    x   ~ N(v_i, Sigma),   Sigma diagonal, Sigma_jj = j**-1.2, j = 1..60
    W_i ~ N(u_i, 1) (60x10)     b_i ~ N(u_i, 1) (10)     y = argmax(x W_i + b_i)

The second argument of N is a standard deviation for alpha, beta and the unit
variances, as in the reference code (``np.random.normal(0, alpha)``), and
Sigma is a covariance, so x's coordinate j has standard deviation
``j**-0.6``. Device i draws from its own stream, spawned from the seed, so a
device's data does not depend on how many devices are generated after it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.errors import ConfigError

__all__ = [
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_FEATURES",
    "Dataset",
    "SyntheticDevice",
    "load_digits",
    "load_npz",
    "synthetic_device",
    "synthetic_devices",
]

SYNTHETIC_FEATURES = 60
SYNTHETIC_CLASSES = 10

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Dataset:
    """Examples and labels of one node, one split, or a whole data set.

    Attributes:
        x: float32 features, shape ``[n, features...]``.
        y: int64 labels, shape ``[n]``, each in ``[0, num_classes)``.
        num_classes: the label space size (the model's output width), which a
            single client's labels may not cover.
        image_shape: ``(channels, height, width)`` when the flat features are
            an image (digits: ``(1, 8, 8)``), for convolutional models.
    """

    x: F32
    y: I64
    num_classes: int
    image_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != np.float32 or self.y.dtype != np.int64:
            raise TypeError(
                f"Dataset wants float32 x and int64 y, got {self.x.dtype}, {self.y.dtype}"
            )
        if self.y.ndim != 1 or self.x.ndim < 2 or len(self.x) != len(self.y):
            raise ValueError(f"x {self.x.shape} and y {self.y.shape} do not describe n examples")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_features(self) -> int:
        """Features per example once flattened."""
        return int(np.prod(self.x.shape[1:]))

    @property
    def images(self) -> F32:
        """``x`` viewed as ``[n, channels, height, width]`` (no copy).

        Raises:
            ValueError: the data set has no image shape.
        """
        if self.image_shape is None:
            raise ValueError("this data set has no image shape")
        return self.x.reshape(len(self.x), *self.image_shape)

    def subset(self, indices: npt.NDArray[np.intp] | slice) -> Dataset:
        """The examples at ``indices``, keeping the label space and image shape."""
        return Dataset(self.x[indices], self.y[indices], self.num_classes, self.image_shape)

    @staticmethod
    def concat(parts: list[Dataset], *, num_classes: int, num_features: int) -> Dataset:
        """Join datasets of the same feature shape; an empty list gives an empty set."""
        if not parts:
            return Dataset(
                np.zeros((0, num_features), np.float32), np.zeros(0, np.int64), num_classes
            )
        return Dataset(
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.y for p in parts]),
            num_classes,
            parts[0].image_shape,
        )


@functools.cache
def _digits_arrays() -> tuple[F32, I64]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ConfigError(
            "the digits data set needs scikit-learn: pip install 'fedbus[datasets]'",
            path="data.dataset",
        ) from exc
    bunch = sk_load_digits()
    # Pixels are counts 0..16; dividing by 16 maps them onto [0, 1] exactly.
    x = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x.flags.writeable = False  # cached and shared: nobody may change it in place
    y.flags.writeable = False
    return x, y


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits: 1,797 examples, 64 features in [0, 1], 10 classes.

    Raises:
        ConfigError: scikit-learn is not installed.
    """
    x, y = _digits_arrays()
    return Dataset(x, y, 10, (1, 8, 8))


def load_npz(path: str | os.PathLike[str], *, num_classes: int | None = None) -> Dataset:
    """Load a data set from an ``.npz`` file holding arrays ``x`` and ``y``.

    Pickled objects are refused (``allow_pickle=False``): a data file from
    elsewhere must not be able to run code.

    Args:
        path: the file.
        num_classes: the label space; by default ``max(y) + 1``. A node's own
            file should pass the federation's value, since its labels may not
            include the highest class.

    Returns:
        The data set; ``x`` of 4 dimensions is taken as channels-first images
        and of 3 as single-channel ones.

    Raises:
        ConfigError: the file is missing or unreadable, an array is missing,
            or the arrays do not fit together; the message names the file.
    """
    name = os.fspath(path)
    try:
        with np.load(name, allow_pickle=False) as npz:
            missing = [a for a in ("x", "y") if a not in npz.files]
            if missing:
                raise ConfigError(f"{name}: missing array(s) {missing}; found {sorted(npz.files)}")
            x_raw, y_raw = npz["x"], npz["y"]
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot read as .npz ({exc})") from exc
    return _validated(name, x_raw, y_raw, num_classes)


def _validated(name: str, x_raw: Any, y_raw: Any, num_classes: int | None) -> Dataset:
    x_arr, y_arr = np.asarray(x_raw), np.asarray(y_raw)
    if not np.issubdtype(x_arr.dtype, np.number) or x_arr.ndim < 2:
        raise ConfigError(
            f"{name}: x must be a numeric array [n, features...], got {x_arr.dtype} {x_arr.shape}"
        )
    if not np.issubdtype(y_arr.dtype, np.integer) or y_arr.ndim != 1:
        raise ConfigError(f"{name}: y must be a 1-d integer array, got {y_arr.dtype} {y_arr.shape}")
    if len(x_arr) != len(y_arr):
        raise ConfigError(f"{name}: x has {len(x_arr)} rows but y has {len(y_arr)}")
    x = x_arr.astype(np.float32)
    if not np.isfinite(x).all():
        raise ConfigError(f"{name}: x contains NaN or infinity")
    y = y_arr.astype(np.int64)
    top = int(y.max()) + 1 if len(y) else 1
    if len(y) and int(y.min()) < 0:
        raise ConfigError(f"{name}: labels must be non-negative")
    classes = top if num_classes is None else num_classes
    if top > classes:
        raise ConfigError(f"{name}: label {top - 1} does not fit num_classes={classes}")
    image_shape: tuple[int, int, int] | None = None
    if x.ndim == 4:
        image_shape = (x.shape[1], x.shape[2], x.shape[3])
    elif x.ndim == 3:
        image_shape = (1, x.shape[1], x.shape[2])
    return Dataset(x, y, classes, image_shape)


@dataclass(frozen=True, slots=True)
class SyntheticDevice:
    """One Synthetic device: its data and the parameters that generated it.

    The parameters are kept so tests (and curious users) can check the labels
    against ``argmax(x @ w + b)``.
    """

    data: Dataset
    u: float
    b_mean: float
    v: npt.NDArray[np.float64]
    w: npt.NDArray[np.float64]
    b: npt.NDArray[np.float64]


# Sigma_jj = j**-1.2; x is drawn as v + z * sqrt(Sigma_jj), one scale per column.
_X_STD = np.arange(1, SYNTHETIC_FEATURES + 1, dtype=np.float64) ** -0.6


def synthetic_device(
    rng: np.random.Generator, *, alpha: float, beta: float, samples: int | None = None
) -> SyntheticDevice:
    """Draw one Synthetic(alpha, beta) device from ``rng``.

    Args:
        rng: the device's own random stream.
        alpha: spread of the model means u_i (how different devices' models are).
        beta: spread of the feature means B_i (how different their inputs are).
        samples: fixed sample count; by default ``floor(lognormal(4, 2)) + 50``.
    """
    # Draw order is part of the data set's definition: keep it fixed.
    n = int(np.floor(rng.lognormal(4.0, 2.0))) + 50 if samples is None else samples
    u = float(rng.normal(0.0, alpha))  # scale 0 gives exactly 0.0 and keeps the draw order
    b_mean = float(rng.normal(0.0, beta))
    v = rng.normal(b_mean, 1.0, SYNTHETIC_FEATURES)
    w = rng.normal(u, 1.0, (SYNTHETIC_FEATURES, SYNTHETIC_CLASSES))
    b = rng.normal(u, 1.0, SYNTHETIC_CLASSES)
    x = v + rng.standard_normal((n, SYNTHETIC_FEATURES)) * _X_STD
    y = np.argmax(x @ w + b, axis=1).astype(np.int64)
    data = Dataset(x.astype(np.float32), y, SYNTHETIC_CLASSES)
    return SyntheticDevice(data, u, b_mean, v, w, b)


def synthetic_devices(
    num_devices: int,
    *,
    alpha: float,
    beta: float,
    seed: int,
    samples_per_client: int | None = None,
) -> list[SyntheticDevice]:
    """Generate ``num_devices`` Synthetic(alpha, beta) devices from ``seed``.

    Device i uses the i-th child of ``SeedSequence(seed)``, so the first k
    devices are the same whether 10 or 1,000 are generated. Labels are
    computed in float64 from the float64 draws, then features are stored as
    float32.

    Raises:
        ConfigError: a parameter is out of range.
    """
    if num_devices < 1:
        raise ConfigError(f"need at least one device, got {num_devices}")
    if alpha < 0 or beta < 0:
        raise ConfigError(
            f"alpha and beta must be >= 0, got {alpha}, {beta}", path="data.synthetic"
        )
    if samples_per_client is not None and samples_per_client < 1:
        raise ConfigError(
            f"must be positive, got {samples_per_client}", path="data.synthetic.samples_per_client"
        )
    children = np.random.SeedSequence(seed).spawn(num_devices)
    return [
        synthetic_device(
            np.random.default_rng(c), alpha=alpha, beta=beta, samples=samples_per_client
        )
        for c in children
    ]

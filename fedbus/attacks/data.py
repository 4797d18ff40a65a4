"""Data poisoning: label flipping and backdoor triggers (simulation only).

A poisoning client trains honestly on corrupted data, so its update looks like
any other client's: the attack is only as visible as its effect on the model.

- Label flipping (Tolpegin et al., "Data Poisoning Attacks Against Federated
  Learning Systems", ESORICS 2020; Fang et al. 2020): ``y -> C - 1 - y``.
- Backdoor (Gu et al., "BadNets", 2017; Bagdasaryan et al., "How To Backdoor
  Federated Learning", AISTATS 2020): stamp a fixed pattern (a square of
  maximal pixels in one corner of the image) on a fraction of the examples and
  relabel them to the target class. Success is measured on triggered test
  inputs whose true class is not the target (`backdoor_test_set`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedbus.learning.data import Dataset

__all__ = ["backdoor_test_set", "flip_labels", "poison_backdoor", "stamp_trigger"]


def flip_labels(data: Dataset) -> Dataset:
    """Every label ``y`` becomes ``num_classes - 1 - y`` (features untouched)."""
    flipped = (data.num_classes - 1 - data.y).astype(np.int64)
    return Dataset(data.x, flipped, data.num_classes, data.image_shape)


def stamp_trigger(
    x: npt.NDArray[np.float32],
    image_shape: tuple[int, int, int] | None,
    *,
    size: int = 2,
    value: float = 1.0,
) -> npt.NDArray[np.float32]:
    """A copy of ``x`` with a ``size`` x ``size`` square set to ``value`` in the bottom-right corner.

    Args:
        x: examples, flat ``[n, features]`` or ``[n, *image_shape]``.
        image_shape: ``(channels, height, width)``; None treats the features as
            one row (the square becomes the last ``size * size`` features).
        size: the square's side in pixels.
        value: the pixel value (digits span [0, 1], so 1.0 is the maximum).
    """
    out = np.array(x, dtype=np.float32, copy=True)
    n = len(out)
    if image_shape is None:
        out.reshape(n, -1)[:, -size * size :] = np.float32(value)
        return out
    view = out.reshape(n, *image_shape)
    view[:, :, -size:, -size:] = np.float32(value)
    return out


def poison_backdoor(
    data: Dataset,
    *,
    target: int = 0,
    poison_fraction: float = 0.5,
    size: int = 2,
    value: float = 1.0,
    rng: np.random.Generator,
) -> Dataset:
    """Stamp the trigger on a random ``poison_fraction`` of ``data`` and relabel those to ``target``.

    Keeping clean examples next to the poisoned ones (Bagdasaryan et al.) lets
    the backdoored model stay accurate on the main task, which is what makes
    the attack stealthy.

    Raises:
        ValueError: ``target`` outside the label space or a fraction outside [0, 1].
    """
    if not 0 <= target < data.num_classes:
        raise ValueError(f"target {target} is not a class of a {data.num_classes}-class data set")
    if not 0.0 <= poison_fraction <= 1.0:
        raise ValueError(f"poison_fraction must be in [0, 1], got {poison_fraction}")
    n = len(data)
    chosen = np.sort(rng.permutation(n)[: round(poison_fraction * n)])
    x = np.array(data.x, copy=True)
    y = np.array(data.y, copy=True)
    x[chosen] = stamp_trigger(data.x[chosen], data.image_shape, size=size, value=value)
    y[chosen] = target
    return Dataset(x, y, data.num_classes, data.image_shape)


def backdoor_test_set(
    data: Dataset, *, target: int = 0, size: int = 2, value: float = 1.0
) -> Dataset:
    """Triggered copies of the examples whose class is not ``target``, all labelled ``target``.

    A model's accuracy on this set is the backdoor's success rate.
    """
    keep = np.flatnonzero(data.y != target)
    x = stamp_trigger(data.x[keep], data.image_shape, size=size, value=value)
    y = np.full(len(keep), target, np.int64)
    return Dataset(x, y, data.num_classes, data.image_shape)

"""Shared plumbing for the aggregators beyond FedAvg: checks, float64 views, flattening.

Every aggregator here follows the same recipe so that arrival order can never
change a bit: sort by sender (`sorted_updates`), turn each update into float64
in the global model's tensor order, compute with numpy operations whose
reduction order depends only on that fixed input order (never a BLAS call
whose blocking may depend on the thread count), and cast back with `cast_like`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedbus.aggregation.base import (
    DELTA,
    DENSE,
    AggregationError,
    Arrays,
    ClientUpdate,
    cast_like,
)
from fedbus.errors import ConfigError

__all__ = [
    "F64",
    "PATH",
    "Stateless",
    "check_updates",
    "delta_vectors",
    "dense_vectors",
    "finish",
    "flatten",
    "float_param",
    "int_param",
    "l2_norm",
    "unflatten",
]

PATH = "protocol.aggregator"
"""The YAML path parameter errors name, plus ``.<field>``."""

F64 = npt.NDArray[np.float64]


def check_updates(updates: Sequence[ClientUpdate], name: str) -> None:
    """Refuse an empty round and encodings an aggregator cannot read.

    Raises:
        AggregationError: no updates, or an encoding other than dense and delta.
    """
    if not updates:
        raise AggregationError(f"{name} needs at least one update")
    for u in updates:
        if u.encoding not in (DENSE, DELTA):
            raise AggregationError(f"{name} cannot read encoding {u.encoding!r} of {u.sender}")


def flatten(arrays: Arrays, names: Sequence[str]) -> F64:
    """Concatenate ``arrays[name]`` for ``names`` into one float64 vector."""
    if not names:
        return np.zeros(0, np.float64)
    return np.concatenate([np.asarray(arrays[n], dtype=np.float64).reshape(-1) for n in names])


def unflatten(vector: F64, like: Arrays) -> dict[str, F64]:
    """Split a flat float64 vector back into ``like``'s names and shapes (still float64)."""
    out: dict[str, F64] = {}
    start = 0
    for name, arr in like.items():
        shape = np.shape(arr)
        size = int(np.prod(shape))
        out[name] = vector[start : start + size].reshape(shape)
        start += size
    return out


def dense_vectors(global_weights: Arrays, updates: Sequence[ClientUpdate]) -> F64:
    """Each update's new weights as a row of float64 (a delta is added to the global model)."""
    names = list(global_weights)
    base = flatten(global_weights, names)
    rows = [
        flatten(u.weights, names) + base if u.encoding == DELTA else flatten(u.weights, names)
        for u in updates
    ]
    return np.stack(rows) if rows else np.zeros((0, base.size), np.float64)


def delta_vectors(global_weights: Arrays, updates: Sequence[ClientUpdate]) -> F64:
    """Each update's change to the global model as a row of float64."""
    names = list(global_weights)
    base = flatten(global_weights, names)
    rows = [
        flatten(u.weights, names) if u.encoding == DELTA else flatten(u.weights, names) - base
        for u in updates
    ]
    return np.stack(rows) if rows else np.zeros((0, base.size), np.float64)


def l2_norm(vector: F64) -> float:
    """Euclidean norm by numpy's pairwise summation (deterministic, unlike a BLAS dot)."""
    return float(np.sqrt(np.sum(vector * vector)))


def int_param(value: Any, field: str, *, minimum: int, path: str = PATH) -> int:
    """Validate an integer parameter at least ``minimum``.

    Raises:
        ConfigError: not an int (bools excluded) or below the minimum; names
            ``<path>.<field>``.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"must be an integer, got {value!r}", path=f"{path}.{field}")
    if value < minimum:
        raise ConfigError(f"must be >= {minimum}, got {value}", path=f"{path}.{field}")
    return int(value)


def float_param(
    value: Any,
    field: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    path: str = PATH,
) -> float:
    """Validate a real parameter inside an interval (open or closed at either end).

    Raises:
        ConfigError: not a finite number, or outside the interval; names
            ``<path>.<field>``.
    """
    where = f"{path}.{field}"
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ConfigError(f"must be a number, got {value!r}", path=where)
    out = float(value)
    if not np.isfinite(out):
        raise ConfigError(f"must be finite, got {out}", path=where)
    if low is not None and (out <= low if low_open else out < low):
        raise ConfigError(f"must be {'>' if low_open else '>='} {low}, got {out}", path=where)
    if high is not None and (out >= high if high_open else out > high):
        raise ConfigError(f"must be {'<' if high_open else '<='} {high}, got {out}", path=where)
    return out


WEIGHTINGS: Final = ("samples", "uniform")


def weighting_param(value: str) -> str:
    """``weighting``: ``samples`` (by num_examples, as FedAvg) or ``uniform`` (plain mean)."""
    if value not in WEIGHTINGS:
        raise ConfigError(
            f"must be 'samples' or 'uniform', got {value!r}", path=f"{PATH}.weighting"
        )
    return value


def weight_coeffs(
    weighting: str, num_examples: Sequence[int], name: str
) -> tuple[list[float], float]:
    """Per-update coefficients for `weighting` and their total (divide by it for the mean).

    Raises:
        AggregationError: the total is not positive (no samples to weigh by).
    """
    if weighting == "uniform":
        coeffs = [1.0] * len(num_examples)
    else:
        coeffs = [float(n) for n in num_examples]
    total = sum(coeffs)
    if total <= 0:
        raise AggregationError(f"{name} needs a positive total num_examples")
    return coeffs, total


def finish(global_weights: Arrays, result: Mapping[str, F64]) -> dict[str, npt.NDArray[Any]]:
    """Cast float64 results back to each global tensor's dtype."""
    return {name: cast_like(result[name], np.asarray(cur)) for name, cur in global_weights.items()}


class Stateless:
    """`state_dict`/`load_state_dict` for aggregators that keep nothing between rounds."""

    name = "stateless"

    def state_dict(self) -> dict[str, npt.NDArray[Any]]:
        """Nothing to save."""
        return {}

    def load_state_dict(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        """Accept only the empty state.

        Raises:
            AggregationError: the state is not empty (it belongs to another aggregator).
        """
        if state:
            raise AggregationError(f"{self.name} has no state; got keys {sorted(state)}")

"""Coordinate-wise and geometric robust aggregators: median, trimmed mean, RFA.

These replace the mean by a statistic that a minority of arbitrary (Byzantine)
updates cannot drag far. They give every update one vote: ``num_examples`` is
reported by the client, so an attacker could claim a huge sample count and
buy itself the majority of a weighted statistic.

All three work on dense weights (a delta is first added to the global
model; a coordinate statistic commutes with that shift) in float64, on the
updates sorted by sender, so arrival order never changes a bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedbus.aggregation._util import (
    F64,
    Stateless,
    check_updates,
    dense_vectors,
    finish,
    float_param,
    int_param,
    unflatten,
)
from fedbus.aggregation.base import AggregationError, Arrays, ClientUpdate, sorted_updates

__all__ = ["CoordinateMedian", "GeometricMedian", "TrimmedMean"]


class CoordinateMedian(Stateless):
    """Coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018).

    Each coordinate of the new model is the median of that coordinate over the
    round's updates, so fewer than half the clients cannot move it outside the
    range of the honest values.
    """

    name: Final = "median"

    def aggregate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Return the coordinate-wise median of the updates' dense weights.

        Raises:
            AggregationError: no updates, an unknown encoding, a repeated sender.
        """
        del round
        ordered = sorted_updates(updates)
        check_updates(ordered, self.name)
        rows = dense_vectors(global_weights, ordered)
        return finish(global_weights, unflatten(np.median(rows, axis=0), global_weights))


class TrimmedMean(Stateless):
    """Coordinate-wise beta-trimmed mean (Yin et al., ICML 2018).

    Per coordinate, the ``floor(beta * n)`` largest and as many smallest values
    are dropped and the rest averaged: tolerates up to that many Byzantine
    clients while keeping more of the honest information than the median.

    Args:
        beta: the fraction trimmed from each end, in [0, 0.5).
    """

    name: Final = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = float_param(beta, "beta", low=0.0, high=0.5, high_open=True)

    def aggregate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Return the trimmed mean of the updates' dense weights.

        Raises:
            AggregationError: no updates, an unknown encoding, a repeated sender.
        """
        del round
        ordered = sorted_updates(updates)
        check_updates(ordered, self.name)
        rows = np.sort(dense_vectors(global_weights, ordered), axis=0)
        n = len(ordered)
        k = int(np.floor(self.beta * n))
        if n - 2 * k < 1:  # cannot happen for beta < 0.5, kept as a guard
            raise AggregationError(f"trimmed_mean with beta={self.beta} trims all {n} updates")
        kept = rows[k : n - k]
        mean = np.sum(kept, axis=0) / np.float64(len(kept))
        return finish(global_weights, unflatten(mean, global_weights))


class GeometricMedian(Stateless):
    """Robust Federated Aggregation (Pillutla et al., IEEE TSP 2022): the geometric median.

    The point minimising the sum of Euclidean distances to the updates, found
    with the smoothed Weiszfeld algorithm: ``z <- sum(a_i x_i / max(nu, |z - x_i|))
    / sum(a_i / max(nu, |z - x_i|))``. Its breakdown point is 1/2, and unlike a
    coordinate statistic it keeps the update's geometry. The iteration count is
    bounded so a round's cost is bounded; Pillutla et al. report 3-4 iterations
    suffice in practice.

    Args:
        max_iter: Weiszfeld iterations at most.
        nu: smoothing; distances below it count as ``nu`` (avoids dividing by 0).
        tol: stop once the objective improves by less than this fraction.
        weighted: weight updates by ``num_examples`` (RFA's alpha_i); off by
            default since clients report their own counts.
    """

    name: Final = "geometric_median"

    def __init__(
        self, max_iter: int = 10, nu: float = 1e-6, tol: float = 1e-6, weighted: bool = False
    ) -> None:
        self.max_iter = int_param(max_iter, "max_iter", minimum=1)
        self.nu = float_param(nu, "nu", low=0.0, low_open=True)
        self.tol = float_param(tol, "tol", low=0.0)
        self.weighted = bool(weighted)
        self.last_iterations = 0
        """Iterations the last call ran (for tests and logs)."""

    def aggregate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Return the (approximate) geometric median of the updates' dense weights.

        Raises:
            AggregationError: no updates, an unknown encoding, a repeated
                sender, a zero total sample count when weighted.
        """
        del round
        ordered = sorted_updates(updates)
        check_updates(ordered, self.name)
        rows = dense_vectors(global_weights, ordered)
        if self.weighted:
            alpha = np.array([u.num_examples for u in ordered], np.float64)
            if alpha.sum() <= 0:
                raise AggregationError("geometric_median needs a positive total num_examples")
        else:
            alpha = np.ones(len(ordered), np.float64)
        alpha /= alpha.sum()
        return finish(global_weights, unflatten(self._weiszfeld(rows, alpha), global_weights))

    def _weiszfeld(self, rows: F64, alpha: F64) -> F64:
        z: F64 = np.sum(alpha[:, None] * rows, axis=0)
        objective = self._objective(rows, alpha, z)
        self.last_iterations = 0
        for _ in range(self.max_iter):
            self.last_iterations += 1
            dist = np.sqrt(np.sum((rows - z) ** 2, axis=1))
            beta = alpha / np.maximum(dist, self.nu)
            z = np.asarray(np.sum(beta[:, None] * rows, axis=0) / np.sum(beta), np.float64)
            new_objective = self._objective(rows, alpha, z)
            if objective - new_objective <= self.tol * max(new_objective, self.nu):
                break
            objective = new_objective
        return z

    @staticmethod
    def _objective(rows: F64, alpha: F64, z: F64) -> float:
        return float(np.sum(alpha * np.sqrt(np.sum((rows - z) ** 2, axis=1))))

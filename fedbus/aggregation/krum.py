"""Distance-based Byzantine-robust aggregators: Krum, Multi-Krum and Bulyan.

Krum scores each update by the summed squared distance to its ``n - f - 2``
nearest neighbours and keeps the best-surrounded ones; Bulyan runs Krum
repeatedly and then applies a coordinate-wise trimmed mean around the median
to what Krum kept. Each has a bound on how many Byzantine clients ``f`` it
tolerates for a round of ``n`` updates; a round that violates it raises
`AggregationError` naming the bound instead of silently giving no guarantee.

Determinism: updates are sorted by sender, distances are numpy sums over the
fixed row order (no BLAS), and every selection uses a stable sort, so ties go
to the earlier sender.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedbus.aggregation._util import (
    F64,
    PATH,
    Stateless,
    check_updates,
    dense_vectors,
    finish,
    int_param,
    unflatten,
)
from fedbus.aggregation.base import AggregationError, Arrays, ClientUpdate, sorted_updates
from fedbus.errors import ConfigError

__all__ = ["Bulyan", "Krum", "MultiKrum", "krum_scores", "pairwise_sq_distances"]


def pairwise_sq_distances(rows: F64) -> F64:
    """Squared Euclidean distances between all rows, summed in a fixed order."""
    n = len(rows)
    out = np.zeros((n, n), np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            diff = rows[i] - rows[j]
            out[i, j] = out[j, i] = np.sum(diff * diff)
    return out


def krum_scores(dist: F64, f: int) -> F64:
    """Krum's score per row: the sum of its ``max(n - f - 2, 1)`` smallest distances to others."""
    n = len(dist)
    k = max(n - f - 2, 1)
    scores = np.empty(n, np.float64)
    for i in range(n):
        others = np.sort(np.delete(dist[i], i))
        scores[i] = np.sum(others[:k])
    return scores


class MultiKrum(Stateless):
    """Multi-Krum (Blanchard et al., "Machine Learning with Adversaries", NeurIPS 2017).

    Keeps the ``m`` updates with the lowest Krum scores and averages them.
    Needs ``n >= 2f + 3`` so every honest update has ``n - f - 2 >= f + 1``
    neighbours to be scored against.

    Args:
        f: the number of Byzantine clients to tolerate.
        m: updates to average; None means ``n - f``.
        weighted: average the kept updates by ``num_examples`` instead of
            one vote each (clients report their own counts, hence off).
    """

    name: str = "multi_krum"

    def __init__(self, f: int = 1, m: int | None = None, weighted: bool = False) -> None:
        self.f = int_param(f, "f", minimum=0)
        self.m = None if m is None else int_param(m, "m", minimum=1)
        self.weighted = bool(weighted)
        self.last_selected: list[str] = []
        """Senders the last call kept, in sender order (for tests and logs)."""

    def aggregate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Return the mean of the ``m`` best-scored updates' dense weights.

        Raises:
            AggregationError: ``n < 2f + 3``, ``m > n``, no updates, an unknown
                encoding, a repeated sender.
        """
        del round
        ordered = sorted_updates(updates)
        check_updates(ordered, self.name)
        n = len(ordered)
        if n < 2 * self.f + 3:
            raise AggregationError(
                f"{self.name} with f={self.f} needs n >= 2f+3 = {2 * self.f + 3} updates, got {n}"
            )
        m = n - self.f if self.m is None else self.m
        if m > n:
            raise AggregationError(f"{self.name} with m={m} needs at least m updates, got {n}")
        rows = dense_vectors(global_weights, ordered)
        scores = krum_scores(pairwise_sq_distances(rows), self.f)
        keep = np.sort(np.argsort(scores, kind="stable")[:m])
        self.last_selected = [ordered[i].sender for i in keep]
        if self.weighted:
            coeff = np.array([ordered[i].num_examples for i in keep], np.float64)
            if coeff.sum() <= 0:
                raise AggregationError(f"{self.name} needs a positive total num_examples")
        else:
            coeff = np.ones(len(keep), np.float64)
        mean = np.sum(coeff[:, None] * rows[keep], axis=0) / np.sum(coeff)
        return finish(global_weights, unflatten(mean, global_weights))


class Krum(MultiKrum):
    """Krum (Blanchard et al., NeurIPS 2017): the single best-scored update becomes the model.

    Args:
        f: the number of Byzantine clients to tolerate; needs ``n >= 2f + 3``.
    """

    name: str = "krum"

    def __init__(self, f: int = 1) -> None:
        super().__init__(f=f, m=1)


class Bulyan(Stateless):
    """Bulyan (El Mhamdi et al., "The Hidden Vulnerability...", ICML 2018).

    1. Selection: apply Krum ``theta = n - 2f`` times, each time moving the
       winner from the remaining set to the selection.
    2. Aggregation: per coordinate, average the ``beta = theta - 2f`` selected
       values closest to the selection's median.

    Krum alone can be steered within a ball whose size grows with the model
    dimension; the coordinate-wise second stage bounds each coordinate too.
    Needs ``n >= 4f + 3``.

    Args:
        f: the number of Byzantine clients to tolerate.
    """

    name: Final = "bulyan"

    def __init__(self, f: int = 1) -> None:
        self.f = int_param(f, "f", minimum=0)
        self.last_selected: list[str] = []
        """Senders the Krum stage of the last call kept, in sender order."""

    @staticmethod
    def check_bound(n: int, f: int) -> None:
        """Raise `ConfigError` naming ``protocol.aggregator.f`` when ``n`` clients cannot hold ``f``.

        For configuration time, when the number of clients per round is known.
        """
        if n < 4 * f + 3:
            raise ConfigError(
                f"bulyan with f={f} needs at least 4f+3 = {4 * f + 3} updates per round, "
                f"but only {n} are expected",
                path=f"{PATH}.f",
            )

    def aggregate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Return Bulyan's aggregate of the updates' dense weights.

        Raises:
            AggregationError: ``n < 4f + 3``, no updates, an unknown encoding,
                a repeated sender.
        """
        del round
        ordered = sorted_updates(updates)
        check_updates(ordered, self.name)
        n, f = len(ordered), self.f
        if n < 4 * f + 3:
            raise AggregationError(
                f"bulyan with f={f} needs n >= 4f+3 = {4 * f + 3} updates, got {n}; "
                "lower f or use trimmed_mean/median"
            )
        rows = dense_vectors(global_weights, ordered)
        dist = pairwise_sq_distances(rows)
        remaining = list(range(n))
        chosen: list[int] = []
        for _ in range(n - 2 * f):
            sub = dist[np.ix_(remaining, remaining)]
            best = int(np.argsort(krum_scores(sub, f), kind="stable")[0])
            chosen.append(remaining.pop(best))
        chosen.sort()
        self.last_selected = [ordered[i].sender for i in chosen]
        selected = rows[chosen]
        beta = len(chosen) - 2 * f
        median = np.median(selected, axis=0)
        closest = np.argsort(np.abs(selected - median), axis=0, kind="stable")[:beta]
        values = np.take_along_axis(selected, closest, axis=0)
        mean = np.sum(values, axis=0) / np.float64(beta)
        return finish(global_weights, unflatten(mean, global_weights))

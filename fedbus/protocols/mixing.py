"""Gossip mixing arithmetic: Metropolis-Hastings weights, push-sum, consensus distance.

Pure functions over plain data (adjacency mappings, numpy arrays, named
tensors), shared by the gossip machines, the runtime's per-round metrics and
the tests. Nothing here knows about rounds, deadlines or messages.

Metropolis-Hastings (Xiao and Boyd 2004): for an undirected graph,
``W[i, j] = 1 / (1 + max(d_i, d_j))`` for each edge and ``W[i, i] = 1 -
sum_j W[i, j]``. The matrix is symmetric and doubly stochastic whatever the
degrees, so repeated mixing converges to the exact average on a connected
graph, and each peer can compute its own row from its neighbours' degrees
alone (no global knowledge).

Push-sum (Kempe et al. 2003): every node holds a numerator ``x`` and a scalar
mass ``w``; a step splits both into equal shares, keeps one and sends one to
each out-neighbour; a receiver adds what it gets. The column-stochastic steps
preserve the totals of ``x`` and ``w``, so the de-biased ratio ``x / w``
converges to the true average on any strongly connected, possibly directed or
time-varying, graph.

Sums over peers are taken in sorted-id order in float64 (`weighted_sum`), so
arrival order never changes a bit, as for the aggregators.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.aggregation import Arrays, cast_like, weighted_sum

__all__ = [
    "consensus_distance",
    "metropolis_matrix",
    "metropolis_row",
    "mix",
    "push_sum_share",
    "push_sum_step",
    "spectral_gap",
]

FloatMatrix = npt.NDArray[np.float64]


def metropolis_row(own_degree: int, neighbour_degrees: Mapping[str, int]) -> dict[str, float]:
    """One peer's Metropolis-Hastings weights for its neighbours (the self weight excluded).

    Args:
        own_degree: this peer's degree in the graph.
        neighbour_degrees: each neighbour's degree in the same graph.

    Returns:
        ``{neighbour: 1 / (1 + max(own, theirs))}``; the self weight is one
        minus their sum, which is always at least ``1 / (1 + own_degree)``.
    """
    return {j: 1.0 / (1.0 + max(own_degree, d)) for j, d in sorted(neighbour_degrees.items())}


def metropolis_matrix(adjacency: Mapping[str, Sequence[str]]) -> tuple[list[str], FloatMatrix]:
    """The whole Metropolis-Hastings matrix of an undirected graph (rows in sorted-id order).

    Raises:
        ValueError: the adjacency is not symmetric or has a self loop.
    """
    ids = sorted(adjacency)
    index = {node: i for i, node in enumerate(ids)}
    for node, neighbours in adjacency.items():
        for other in neighbours:
            if other == node or node not in adjacency.get(other, ()):
                raise ValueError(f"adjacency is not undirected and simple at {node!r}-{other!r}")
    degree = {node: len(set(adjacency[node])) for node in ids}
    matrix = np.zeros((len(ids), len(ids)), dtype=np.float64)
    for node in ids:
        row = metropolis_row(degree[node], {j: degree[j] for j in set(adjacency[node])})
        for other, weight in row.items():
            matrix[index[node], index[other]] = weight
        matrix[index[node], index[node]] = 1.0 - sum(row.values())
    return ids, matrix


def mix(
    models: Mapping[str, Arrays], coeffs: Mapping[str, float], *, like: Arrays
) -> dict[str, Any]:
    """Return ``sum_k coeffs[k] * models[k]`` per tensor, cast to ``like``'s dtypes.

    Terms are added in sorted-key order in float64, so the result does not
    depend on the order the models arrived in.
    """
    keys = sorted(coeffs)
    result: dict[str, Any] = {}
    for name, reference in like.items():
        total = weighted_sum([np.asarray(models[k][name]) for k in keys], [coeffs[k] for k in keys])
        result[name] = cast_like(total, np.asarray(reference))
    return result


def push_sum_share(x: Arrays, mass: float, parts: int) -> tuple[dict[str, Any], float]:
    """One of ``parts`` equal push-sum shares of ``(x, mass)``, in float64.

    Numerators stay float64 whatever the model dtype: the shares of a float32
    model would otherwise round away mass at every step.
    """
    if parts < 1:
        raise ValueError(f"parts must be positive, got {parts}")
    scale = 1.0 / parts
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in x.items()}, mass * scale


def push_sum_step(
    values: FloatMatrix, masses: npt.NDArray[np.float64], out_neighbours: Sequence[Sequence[int]]
) -> tuple[FloatMatrix, npt.NDArray[np.float64]]:
    """One synchronous push-sum step of a whole network (rows of ``values`` are nodes).

    Node ``i`` keeps ``1 / (1 + len(out[i]))`` of its numerator and mass and
    sends as much to each ``out[i]`` node. Used by tests and simulations; the
    machines do the same one share at a time.
    """
    new_values = np.zeros_like(values)
    new_masses = np.zeros_like(masses)
    for i, targets in enumerate(out_neighbours):
        share = 1.0 / (1 + len(targets))
        for j in (i, *targets):
            new_values[j] += share * values[i]
            new_masses[j] += share * masses[i]
    return new_values, new_masses


def consensus_distance(models: Sequence[Arrays]) -> float:
    """Mean L2 distance of the models from their average (all tensors flattened together).

    Zero exactly when every peer holds the same model; the gossip metric of
    DESIGN.md section 3.
    """
    if not models:
        return 0.0
    flat = np.stack(
        [
            np.concatenate([np.asarray(m[k], dtype=np.float64).reshape(-1) for k in sorted(m)])
            for m in models
        ]
    )
    centre = flat.mean(axis=0)
    return float(np.linalg.norm(flat - centre, axis=1).mean())


def spectral_gap(matrix: FloatMatrix) -> float:
    """``1 - |lambda_2|`` of a mixing matrix: how fast repeated mixing reaches consensus.

    Positive for a connected graph's Metropolis-Hastings matrix; zero when
    the graph is disconnected (the eigenvalue 1 repeats).
    """
    eigenvalues = sorted(np.abs(np.linalg.eigvals(matrix)), reverse=True)
    return float(1.0 - eigenvalues[1]) if len(eigenvalues) > 1 else 1.0

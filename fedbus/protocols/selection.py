"""Seeded client selection, shared by the FedAvg server and the reference loop.

Selection depends only on (seed, round, attempt) and the sorted set of live
nodes, never on a random stream carried between rounds, so a resumed run
selects exactly what the uninterrupted run would have, and the one-process
reference loop in ``benchmarks/reference_fedavg.py`` can reproduce it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from fedbus._types import NodeId

__all__ = ["select_nodes", "selection_size"]


def selection_size(
    available: int, *, clients_per_round: int | None, fraction: float | None, min_clients: int = 1
) -> int:
    """How many of ``available`` nodes a round selects.

    ``clients_per_round`` if given; else ``floor(fraction * available)`` as in
    McMahan et al. (C * K), never below ``min_clients`` or 1; else all. Capped
    at ``available``. The topology validator and the server both use this one
    rule, so what ``fedbus validate`` promises is what a run does.
    """
    if clients_per_round is not None:
        k = clients_per_round
    elif fraction is not None:
        # The epsilon keeps 0.29 * 100 at 29, not 28.999...
        k = max(1, min_clients, math.floor(fraction * available + 1e-9))
    else:
        k = available
    return min(k, available)


def select_nodes(
    seed: int, round_num: int, attempt: int, live: Sequence[NodeId], k: int
) -> frozenset[NodeId]:
    """Pick ``k`` of ``live`` for attempt ``attempt`` of round ``round_num``.

    Args:
        seed: the run's seed.
        round_num: 1-based round.
        attempt: 1 for the first try of the round (as the server numbers
            attempts), then 2, 3, ... after a missed quorum (each retry gets a
            fresh selection).
        live: the candidate nodes; their order does not matter.
        k: how many to pick; all of them when ``k >= len(live)``.
    """
    ordered = sorted(live)
    if k >= len(ordered):
        return frozenset(ordered)
    rng = random.Random(f"fedbus.select:{seed}:{round_num}:{attempt}")
    return frozenset(rng.sample(ordered, k))

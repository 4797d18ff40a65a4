"""Seeded client selection, shared by the FedAvg server and the reference loop.

Selection depends only on (seed, round, attempt) and the sorted set of live
nodes, never on a random stream carried between rounds, so a resumed run
selects exactly what the uninterrupted run would have, and the one-process
reference loop in ``benchmarks/reference_fedavg.py`` can reproduce it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fedbus._types import NodeId

__all__ = ["select_nodes"]


def select_nodes(
    seed: int, round_num: int, attempt: int, live: Sequence[NodeId], k: int
) -> frozenset[NodeId]:
    """Pick ``k`` of ``live`` for attempt ``attempt`` of round ``round_num``.

    Args:
        seed: the run's seed.
        round_num: 1-based round.
        attempt: 0 for the first try of the round, then 1, 2, ... after a
            missed quorum (each retry gets a fresh selection).
        live: the candidate nodes; their order does not matter.
        k: how many to pick; all of them when ``k >= len(live)``.
    """
    ordered = sorted(live)
    if k >= len(ordered):
        return frozenset(ordered)
    rng = random.Random(f"fedbus.select:{seed}:{round_num}:{attempt}")
    return frozenset(rng.sample(ordered, k))

"""Simulated faults of one client node (topology ``faults:``), decided reproducibly.

The launcher turns the topology's fault list into one `FaultPlan` per client;
the client runtime asks it, round by round, whether to crash, skip, answer
late or leave for a while. Each decision draws from its own
`random.Random` seeded with ``(seed, fault kind, round, node)``
(`fedbus.learning.seeds.derive_seed`), so a run with the same seed injects
the same faults whatever the timing, and a resumed run the same as the
uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fedbus.learning.seeds import derive_seed

__all__ = ["FaultPlan"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultPlan:
    """The faults one client injects.

    Attributes:
        node_id: the client.
        seed: the run's seed.
        crash_round: the round at which the node dies for good (None: never).
        dropout: chance that, selected, it skips a round (no answer at all).
        straggler: chance that it answers ``straggler_delay_s`` late.
        straggler_delay_s: the delay of a straggling answer.
        churn: chance, per round, that it leaves uncleanly...
        churn_down_rounds: ...and comes back this many rounds later.
    """

    node_id: str
    seed: int = 0
    crash_round: int | None = None
    dropout: float = 0.0
    straggler: float = 0.0
    straggler_delay_s: float = 0.0
    churn: float = 0.0
    churn_down_rounds: int = 1

    @property
    def active(self) -> bool:
        """Whether any fault applies to this node."""
        return bool(self.crash_round is not None or self.dropout or self.straggler or self.churn)

    def _hit(self, kind: str, round_num: int, probability: float) -> bool:
        if probability <= 0.0:
            return False
        rng = random.Random(derive_seed(self.seed, "fault", kind, round_num, self.node_id))
        return rng.random() < probability

    def crashes(self, round_num: int) -> bool:
        """Whether the node is dead by ``round_num``."""
        return self.crash_round is not None and round_num >= self.crash_round

    def drops(self, round_num: int) -> bool:
        """Whether the node skips ``round_num`` although selected."""
        return self._hit("dropout", round_num, self.dropout)

    def delay_s(self, round_num: int) -> float:
        """How late the node answers ``round_num`` (0: on time)."""
        return self.straggler_delay_s if self._hit("straggler", round_num, self.straggler) else 0.0

    def leaves(self, round_num: int) -> int:
        """For how many rounds the node goes away when ``round_num`` starts (0: it stays)."""
        return self.churn_down_rounds if self._hit("churn", round_num, self.churn) else 0

"""The gossip peer runtime's vocabulary: settings, observer callbacks, outcome, machine helpers.

Kept apart from `fedbus.nodes.peer` (the runtime itself) so the launcher and
the monitor can name them without the runtime's imports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fedbus._types import RunId
from fedbus.protocols.gossip import GossipPeer, PeerState
from fedbus.protocols.gossip_pushsum import PushSumPeer, PushSumState
from fedbus.protocols.gossip_types import RoundMixed

__all__ = [
    "MachineFactory",
    "PeerMachine",
    "PeerObserver",
    "PeerOutcome",
    "PeerSettings",
    "completed_rounds",
    "is_finished",
]

PeerMachine = GossipPeer | PushSumPeer
MachineFactory = Callable[[RunId], PeerMachine]


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerSettings:
    """Who the peer is and whom it talks to.

    Attributes:
        node_id: this peer's id (its MQTT client id).
        namespace: the topic run level (the topology name).
        neighbours: its graph neighbours.
        seed: the run's seed; round r trains with ``fit_seed(seed, r, node_id)``.
        join_attempts: Joins sent to a silent neighbour per connection.
        join_backoff_s: first wait for an answer; doubles per attempt (max 8 s).
        rejoin_wait_s: after a reconnection, how long to wait for the
            neighbours' answers before the machine runs on.
        round_hint_s: assumed round length before one was seen (churn down time).
        round_timeout_s: the protocol's round deadline (bounds a churn absence).
        linger_s: after the last round, how long to stay connected for
            neighbours that are away (to answer their rejoin sync).
    """

    node_id: str
    namespace: str
    neighbours: tuple[str, ...]
    seed: int = 0
    join_attempts: int = 8
    join_backoff_s: float = 0.5
    rejoin_wait_s: float = 2.0
    round_hint_s: float = 2.0
    round_timeout_s: float = 30.0
    linger_s: float = 0.0


class PeerObserver:
    """Callbacks of the launcher's monitor; every method is optional."""

    def on_mixed(self, peer: str, mixed: RoundMixed) -> None:
        """``peer`` finished a round (or push-sum step) with a new model."""

    def on_gone(self, peer: str, status: str) -> None:
        """``peer`` ended (finished, crashed, failed) or went away for a while (away)."""


@dataclass(frozen=True, slots=True)
class PeerOutcome:
    """How a peer ended: ``finished``, ``crashed`` (simulated) or ``failed`` (``reason``)."""

    node_id: str
    status: Literal["finished", "crashed", "failed"]
    reason: str = ""
    completed_round: int = 0


def completed_rounds(machine: PeerMachine) -> int:
    """The rounds (push-sum: steps) the machine has completed."""
    if isinstance(machine, GossipPeer):
        return machine.completed_round
    done = machine.state is PushSumState.FINISHED
    return machine.current_round if done else max(0, machine.current_round - 1)


def is_finished(machine: PeerMachine) -> bool:
    """Whether the machine ran all its rounds."""
    return machine.state in (PeerState.FINISHED, PushSumState.FINISHED)

"""Synchronous gossip peer states and its PEER_TRANSITIONS table.

The theory of operation (what each transition means, the invariants) opens
`fedbus.protocols.gossip`; this module holds the data the machine looks
transitions up in, so the table can be read (and tested) on its own.
"""

from __future__ import annotations

import enum

from fedbus.protocols.base import Event
from fedbus.protocols.fedavg_types import Started, Tick, TrainingDone, TrainingFailed
from fedbus.protocols.gossip_types import (
    NeighbourJoined,
    NeighbourLost,
    PeerModelReceived,
    PeerSnapshotReceived,
    Rejoined,
)

__all__ = ["PEER_TRANSITIONS", "PeerState"]


class PeerState(enum.Enum):
    """Where a gossip peer stands; see `fedbus.protocols.gossip`."""

    IDLE = "idle"
    WAITING_FOR_NEIGHBOURS = "waiting"
    TRAINING = "training"
    COLLECTING = "collecting"
    SYNCING = "syncing"
    FINISHED = "finished"
    ERROR = "error"


_P = PeerState
_REMOTE: tuple[type[Event], ...] = (
    NeighbourJoined, NeighbourLost, PeerModelReceived, PeerSnapshotReceived, Rejoined, Tick,
)  # fmt: skip


def _row(
    state: PeerState, changes: dict[type[Event], frozenset[PeerState]]
) -> dict[type[Event], frozenset[PeerState]]:
    row = {kind: frozenset({state}) for kind in _REMOTE}
    for kind, targets in changes.items():
        row[kind] = row.get(kind, frozenset()) | targets
    return row


_NEXT = frozenset({_P.TRAINING, _P.COLLECTING, _P.FINISHED})
_SYNC = frozenset({_P.SYNCING}) | _NEXT
PEER_TRANSITIONS: dict[PeerState, dict[type[Event], frozenset[PeerState]]] = {
    _P.IDLE: _row(
        _P.IDLE, {Started: frozenset({_P.WAITING_FOR_NEIGHBOURS, _P.TRAINING, _P.FINISHED})}
    ),
    _P.WAITING_FOR_NEIGHBOURS: _row(
        _P.WAITING_FOR_NEIGHBOURS,
        {NeighbourJoined: frozenset({_P.TRAINING}), Tick: frozenset({_P.TRAINING})},
    ),
    _P.TRAINING: _row(
        _P.TRAINING,
        {
            TrainingDone: frozenset({_P.COLLECTING}) | _NEXT,
            TrainingFailed: frozenset({_P.COLLECTING}) | _NEXT,
            Rejoined: _SYNC,
        },
    ),
    _P.COLLECTING: _row(
        _P.COLLECTING,
        {PeerModelReceived: _NEXT, NeighbourLost: _NEXT, Tick: _NEXT, Rejoined: _SYNC},
    ),
    _P.SYNCING: _row(
        _P.SYNCING,
        {PeerSnapshotReceived: _NEXT, NeighbourLost: _NEXT, NeighbourJoined: _NEXT, Tick: _NEXT},
    ),
    _P.FINISHED: _row(_P.FINISHED, {}),
    _P.ERROR: {},
}
"""state -> {legal event type -> states it may lead to}; a missing entry is illegal."""

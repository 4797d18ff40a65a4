"""FedAvg server states and its TRANSITIONS table.

The theory of operation (what each transition means, the invariants) opens
`fedbus.protocols.fedavg_server`; this module holds the data the machine looks
transitions up in, so the table can be read (and tested) on its own.
"""

from __future__ import annotations

from fedbus._types import StateEnum
from fedbus.protocols.base import Event
from fedbus.protocols.fedavg_types import (
    NodeJoined,
    NodeLeft,
    SenderMismatched,
    Started,
    Tick,
    UpdateFailed,
    UpdateReceived,
)

__all__ = ["TRANSITIONS", "ServerState"]


class ServerState(StateEnum):
    """Where the server stands; see the module docstring."""

    IDLE = "idle"
    WAITING_FOR_NODES = "waiting"
    COLLECTING = "collecting"
    EVALUATING = "evaluating"
    FINISHED = "finished"
    ERROR = "error"


_S = ServerState
_Targets = frozenset[ServerState]
_Row = dict[type[Event], _Targets]
# Whatever ends a round attempt may lead to the next attempt or round
# (COLLECTING), a wait for nodes, the final evaluation or the end.
_ENDS_ROUND: _Targets = frozenset({_S.COLLECTING, _S.WAITING_FOR_NODES, _S.EVALUATING, _S.FINISHED})


def _row(state: ServerState, changes: _Row | None = None) -> _Row:
    """Remote events and ticks are legal everywhere and may keep ``state``; add ``changes``."""
    kinds: tuple[type[Event], ...] = (
        NodeJoined, NodeLeft, UpdateReceived, UpdateFailed, SenderMismatched, Tick,
    )  # fmt: skip
    row: _Row = {kind: frozenset({state}) for kind in kinds}
    for kind, targets in (changes or {}).items():
        row[kind] = row.get(kind, frozenset()) | targets
    return row


TRANSITIONS: dict[ServerState, _Row] = {
    _S.IDLE: _row(_S.IDLE, {Started: _ENDS_ROUND}),
    _S.WAITING_FOR_NODES: _row(
        _S.WAITING_FOR_NODES,
        {NodeJoined: frozenset({_S.COLLECTING}), Tick: frozenset({_S.COLLECTING, _S.FINISHED})},
    ),
    _S.COLLECTING: _row(
        _S.COLLECTING,
        {
            NodeLeft: _ENDS_ROUND,
            UpdateReceived: _ENDS_ROUND,
            UpdateFailed: _ENDS_ROUND,
            Tick: _ENDS_ROUND,
        },
    ),
    _S.EVALUATING: _row(
        _S.EVALUATING,
        {kind: frozenset({_S.FINISHED}) for kind in (NodeLeft, UpdateReceived, UpdateFailed, Tick)},
    ),
    _S.FINISHED: _row(_S.FINISHED),
    _S.ERROR: {},
}
"""state -> {legal event type -> states it may lead to}; a missing entry is illegal.

Started appears only under IDLE: starting twice is our bug. ERROR has no row.
"""

"""The upward side of a hierarchy node: a FedAvg client that can re-home.

Theory of operation
===================

`Upstream` composes three parts a node below the cloud needs toward its
parent: a `FedAvgClient` (which models to act on), a `Rehoming` (when the
parent is gone and where to go) and an `AccountingGate` (no top-level round
answered twice across parents). `HierarchicalClient` is the device machine
built on it; `EdgeAggregator` uses it for its own upward side.

Events: FedAvg client events (``ModelReceived``, ``ManifestReceived``,
``TrainingDone``, ``EvaluationDone``, ``TrainingFailed``) plus `ParentLost`,
`ParentHeard` and ``Tick``. Each model or manifest also counts as
`ParentHeard`. Commands: the client's (``Train``, ``Evaluate``,
``CancelTraining``, ``SendUpdate``, ``SendFailure``, ``Stop``) plus
`SwitchParent` and `Stranded`.

On a switch: the outstanding task, if any, is cancelled (``CancelTraining``
before ``SwitchParent``) and the FedAvg client is replaced by a fresh one,
because round numbers belong to the parent: the new parent's round 3 may come
after the old one's round 7. Results of the cancelled task that still arrive
are dropped; the runtime should not deliver them, and if one arrives after the
new parent asked for the same round number it cannot be told apart (the
trainer events carry no task id).

Gate: a model the gate refuses (its top-level round was already trained for
through the previous parent) reaches the client as not selected, and the node
answers it with ``SendFailure`` at once so that the new parent's round does
not wait for it.

States: the client's (`ClientState`); `HierarchicalClient.rehome_state` tells
whether the node is stranded. Invariants: at most one parent at a time; each
top-level round trained for through at most one parent.
"""

from __future__ import annotations

import dataclasses
import enum

from fedbus._types import NodeId, RunId
from fedbus.errors import LocalProtocolError
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg_client import ClientState, FedAvgClient
from fedbus.protocols.fedavg_types import (
    CancelTraining,
    Evaluate,
    EvaluationDone,
    ManifestReceived,
    ModelReceived,
    SendFailure,
    Started,
    Tick,
    Train,
    TrainingDone,
    TrainingFailed,
)
from fedbus.protocols.hierarchical_rehoming import (
    AccountingGate,
    ParentHeard,
    ParentLost,
    RehomeState,
    Rehoming,
    SwitchParent,
)

__all__ = ["HierarchicalClient", "Upstream"]

_BUSY = (ClientState.TRAINING, ClientState.EVALUATING)


class Upstream:
    """FedAvg client + re-homing + accounting gate (see the module docstring).

    Args:
        run: the run id (the same at every level).
        rehoming: the re-homing policy; None for a node that never re-homes.
    """

    def __init__(self, *, run: RunId, rehoming: Rehoming | None = None) -> None:
        self.run = run
        self.rehoming = rehoming
        self.client = FedAvgClient(run=run)
        self.gate = AccountingGate()
        self._switched = False

    @property
    def parent(self) -> NodeId | None:
        """The parent in force, when re-homing is configured."""
        return None if self.rehoming is None else self.rehoming.parent

    def next_deadline(self) -> float | None:
        """The re-homing watchdog, if any (the client keeps none)."""
        return None if self.rehoming is None else self.rehoming.next_deadline()

    def feed(self, event: Event, *, now: float) -> list[Command]:
        """Handle one upward event; see the module docstring.

        Raises:
            LocalProtocolError: from the client or the policy (our misuse).
        """
        match event:
            case ModelReceived():
                out = self._heard(now)
                return out + self._on_model(event, now)
            case ManifestReceived():
                out = self._heard(now)
                return out + self.client.handle(event, now=now)
            case ParentLost() | ParentHeard() | Started():
                return self._policy(event, now)
            case Tick():
                return self._policy(event, now) + self.client.handle(event, now=now)
            case TrainingDone() | EvaluationDone() | TrainingFailed():
                if self._switched and not (
                    self.client.state in _BUSY and event.round == self.client.current_round
                ):
                    return []  # the result of work cancelled by a switch
                return self.client.handle(event, now=now)
        raise LocalProtocolError(f"{type(event).__name__} is not an upward event")

    def _heard(self, now: float) -> list[Command]:
        parent = self.parent
        return [] if parent is None else self._policy(ParentHeard(parent=parent), now)

    def _on_model(self, event: ModelReceived, now: float) -> list[Command]:
        refused = event.selected and not self.gate.admits(event)
        delivered = dataclasses.replace(event, selected=False) if refused else event
        out = self.client.handle(delivered, now=now)
        if refused:
            top = self.gate.top_round(event)
            out.append(
                SendFailure(
                    round=event.round, reply_to=event.model_id,
                    reason=f"top-level round {top} was trained for through a previous parent",
                )
            )  # fmt: skip
        if any(isinstance(c, Train | Evaluate) and c.round == event.round for c in out):
            self.gate.trained(event)
        return out

    def _policy(self, event: Event, now: float) -> list[Command]:
        if self.rehoming is None:
            return []
        out: list[Command] = []
        for command in self.rehoming.handle(event, now=now):
            if isinstance(command, SwitchParent):
                if self.client.state in _BUSY:
                    out.append(CancelTraining(round=self.client.current_round))
                self.client = FedAvgClient(run=self.run)
                self.gate.switched()
                self._switched = True
            out.append(command)
        return out


class HierarchicalClient:
    """A device under an edge aggregator: a FedAvg client that re-homes.

    Args:
        run: the run id.
        rehoming: the re-homing policy; None: never re-home (plain FedAvg client).
    """

    def __init__(self, *, run: RunId, rehoming: Rehoming | None = None) -> None:
        self.upstream = Upstream(run=run, rehoming=rehoming)

    @property
    def state(self) -> enum.Enum:
        """The FedAvg client's state (a fresh client's after a switch)."""
        return self.upstream.client.state

    @property
    def parent(self) -> NodeId | None:
        """The parent in force (None without re-homing)."""
        return self.upstream.parent

    @property
    def rehome_state(self) -> RehomeState | None:
        """ATTACHED or STRANDED (None without re-homing)."""
        return None if self.upstream.rehoming is None else self.upstream.rehoming.state

    def next_deadline(self) -> float | None:
        """The re-homing watchdog, if any."""
        return self.upstream.next_deadline()

    def handle(self, event: Event, *, now: float) -> list[Command]:
        """Handle one event at time ``now`` (`Started` arms the watchdog).

        Raises:
            LocalProtocolError: our own misuse; see `FedAvgClient` and `Rehoming`.
        """
        return self.upstream.feed(event, now=now)

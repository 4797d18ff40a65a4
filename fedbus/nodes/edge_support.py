"""What an `fedbus.nodes.edge.EdgeNode` is configured with and reports through.

Namespaces (`namespace_of`), settings (`EdgeSettings`), the per-level
observer (`EdgeObserver`), the outcome (`EdgeOutcome`) and the bound on
request ids (`bounded_id`): kept apart so the runtime module is about the
runtime.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from fedbus.protocols.fedavg import RoundClosed, SendUpdate
from fedbus.protocols.hierarchical import TaskEnded

__all__ = ["EdgeObserver", "EdgeOutcome", "EdgeSettings", "bounded_id", "namespace_of"]


def namespace_of(name: str, node_id: str, *, server: str | None) -> str:
    """The topic namespace of ``node_id``'s children.

    The topology name for the server, ``<name>.<node-id>`` for an edge (hashed
    when that would exceed one 64-character topic level).
    """
    if node_id == server:
        return name
    full = f"{name}.{node_id}"
    if len(full) <= 64:
        return full
    digest = hashlib.sha256(node_id.encode()).hexdigest()[:16]
    return f"{name[:47]}.{digest}"


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeSettings:
    """Who the edge is, its parent, and its two namespaces.

    Attributes:
        node_id: the edge's id.
        parent: its parent's id.
        up_namespace: the parent's namespace.
        down_namespace: this edge's own namespace.
        children: the children the topology declares (waited for before joining up).
        join_timeout_s: how long to wait for them.
        join_attempts: Joins sent to the parent before giving up on an answer.
        join_backoff_s: first wait for the parent's Ack; doubles per attempt (max 8 s).
        namespaces: the children's namespace of each parent this edge may re-home
            to over its upward connection (its fallbacks on the same broker).
        watch: each such parent's namespaces where its last will may appear.
    """

    node_id: str
    parent: str
    up_namespace: str
    down_namespace: str
    children: tuple[str, ...] = ()
    join_timeout_s: float = 60.0
    join_attempts: int = 8
    join_backoff_s: float = 0.5
    namespaces: Mapping[str, str] = field(default_factory=dict)
    watch: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


class EdgeObserver:
    """Per-level progress callbacks; every method is optional."""

    def on_local_round(self, edge: str, closed: RoundClosed) -> None:
        """A local round of ``edge`` closed."""

    def on_task_done(self, edge: str, top_round: int, update: SendUpdate) -> None:
        """``edge`` sent its update for cloud round ``top_round`` upward."""

    def on_task_ended(self, edge: str, report: TaskEnded) -> None:
        """``edge`` ended its part of a parent round (per-level metrics, restart point)."""


@dataclass(frozen=True, slots=True)
class EdgeOutcome:
    """How an edge ended: ``finished``, ``crashed`` (simulated) or ``failed`` (``reason``)."""

    node_id: str
    status: Literal["finished", "crashed", "failed"]
    reason: str = ""


def bounded_id(request_id: str) -> str:
    """The machine's ``<edge>:<request>`` id, hashed if beyond the wire's 128 characters."""
    if len(request_id) <= 128:
        return request_id
    return hashlib.sha256(request_id.encode()).hexdigest()[:32]

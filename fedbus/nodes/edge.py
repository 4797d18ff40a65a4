"""`EdgeNode`: runs an `EdgeAggregator` between its children and its parent.

Downward the edge is a server in its own topic namespace (``<name>.<edge-id>``,
`namespace_of`), so its group's traffic stays local: it publishes a retained
``manifest`` and the local ``model`` broadcasts there, and its devices (or
sub-edges) Join, send updates and leave (wills) there. Upward it is a client
of its parent in the parent's namespace: it learns the run from the parent's
retained manifest, Joins (repeated with backoff until acknowledged), receives
the parent's models and sends one update per parent round.

Connections (see `fedbus.nodes.namespaces`): when the children use the
parent's broker, both sides share one connection whose last will is a Leave
in the parent's namespace (the parent stops waiting for the edge; the
children watch that topic too, see `fedbus.nodes.device`). With a broker of
its own (``broker:`` on the edge) the edge holds two connections, each with
a will in its own namespace.

The edge waits for its declared children to join (at most ``join_timeout_s``)
before it joins its parent, so that the first parent round finds its group
complete. A simulated crash (``faults: crash``) is decided when a parent
model of round ``at_round`` or later arrives: the connections drop without
DISCONNECT and the wills go out, which is what makes the children re-home.
Edges themselves do not re-home in this runtime (documented limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fedbus._types import NodeId, RunId
from fedbus.errors import FedbusError
from fedbus.messages import (
    Ack,
    Join,
    Leave,
    Manifest,
    ModelBroadcast,
    ModelUpdate,
    UpdateFailure,
    compact_selection,
    confirms_join,
    is_selected,
    tensors_from_arrays,
    tensors_to_arrays,
)
from fedbus.nodes.client import _scalars
from fedbus.nodes.driver import Driver
from fedbus.nodes.faults import FaultPlan
from fedbus.nodes.server import LEAVE_CHANNEL, MANIFEST_CHANNEL, MODEL_CHANNEL
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg import (
    BroadcastModel,
    ManifestReceived,
    ModelReceived,
    NodeJoined,
    NodeLeft,
    PublishManifest,
    Reject,
    RoundClosed,
    RoundFailed,
    SendFailure,
    SendUpdate,
    Started,
    Stop,
    UpdateFailed,
    UpdateReceived,
)
from fedbus.protocols.hierarchical import EdgeAggregator
from fedbus.transport.base import Transport
from fedbus.transport.messenger import Messenger

__all__ = ["EdgeNode", "EdgeObserver", "EdgeOutcome", "EdgeSettings", "namespace_of"]

log = logging.getLogger(__name__)


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
    """

    node_id: str
    parent: str
    up_namespace: str
    down_namespace: str
    children: tuple[str, ...] = ()
    join_timeout_s: float = 60.0
    join_attempts: int = 8
    join_backoff_s: float = 0.5


class EdgeObserver:
    """Per-level progress callbacks; every method is optional."""

    def on_local_round(self, edge: str, closed: RoundClosed) -> None:
        """A local round of ``edge`` closed."""

    def on_task_done(self, edge: str, top_round: int, update: SendUpdate) -> None:
        """``edge`` sent its update for cloud round ``top_round`` upward."""


@dataclass(frozen=True, slots=True)
class EdgeOutcome:
    """How an edge ended: ``finished``, ``crashed`` (simulated) or ``failed`` (``reason``)."""

    node_id: str
    status: Literal["finished", "crashed", "failed"]
    reason: str = ""


class EdgeNode:
    """The edge aggregator runtime (see the module docstring).

    Args:
        machine: the edge machine (its run id is the run's).
        up: the connection toward the parent (a view or a transport, entered by the caller).
        down: the connection toward the children (idem).
        settings: identity, parent and namespaces.
        faults: simulated faults (a crash); None injects none.
        observer: per-level callbacks.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        machine: EdgeAggregator,
        up: Transport,
        down: Transport,
        settings: EdgeSettings,
        *,
        faults: FaultPlan | None = None,
        observer: EdgeObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.machine = machine
        self.settings = settings
        self.id = settings.node_id
        self.run_id: RunId = machine.run
        self._up_transport, self._down_transport = up, down
        self._faults = faults if faults is not None and faults.active else None
        self._observer = observer or EdgeObserver()
        self._clock = clock
        self._up: Messenger | None = None
        self._down: Messenger | None = None
        self._joined: set[str] = set()
        self._children_in = asyncio.Event()
        self._confirmed = asyncio.Event()
        self._join_ids: set[str] = set()
        self._top_round: dict[int, int] = {}
        self._crashed = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> EdgeOutcome:
        """Serve until the parent finishes the run (or a simulated crash); never raises."""
        try:
            return await self._run()
        except Exception as exc:  # the node runtime boundary (STYLE.md section 6)
            log.exception("node %s failed", self.id)
            return EdgeOutcome(self.id, "failed", f"{type(exc).__name__}: {exc}")

    async def _run(self) -> EdgeOutcome:
        s = self.settings
        async with (
            Messenger(
                self._down_transport, node_id=self.id, run=s.down_namespace, strict_run=False
            ) as down,
            Messenger(
                self._up_transport, node_id=self.id, run=s.up_namespace, strict_run=False
            ) as up,
        ):
            self._up, self._down = up, down
            await down.subscribe_broadcasts(None, LEAVE_CHANNEL)
            await up.subscribe_broadcasts(s.parent, MANIFEST_CHANNEL)
            await up.subscribe_broadcasts(s.parent, MODEL_CHANNEL)
            if not s.children:
                self._children_in.set()
            driver = Driver(self.machine, self._execute, clock=self._clock)
            try:
                async with asyncio.TaskGroup() as tg:
                    receivers = [
                        tg.create_task(self._receive_down(driver, down), name=f"fedbus[{self.id}].down"),
                        tg.create_task(self._receive_up(driver, up), name=f"fedbus[{self.id}].up"),
                    ]  # fmt: skip
                    self._spawn(self._join_parent(up))
                    await driver.feed(Started())
                    await driver.run()
                    for task in receivers:
                        task.cancel()
            finally:
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if not self._crashed:
                with contextlib.suppress(Exception):  # best effort: the run is over either way
                    async with asyncio.timeout(5.0):
                        await down.clear_retained(MANIFEST_CHANNEL)
        if self._crashed:
            return EdgeOutcome(self.id, "crashed", "simulated crash")
        return EdgeOutcome(self.id, "finished")

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=f"fedbus[{self.id}].join")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- children ---------------------------------------------------------------------

    async def _receive_down(self, driver: Driver, messenger: Messenger) -> None:
        async for topic, msg in messenger.messages():
            sender = NodeId(msg.sender)
            event: Event | None = None
            if isinstance(msg, Leave):
                event = NodeLeft(node=sender, reason=msg.reason or "left")
            elif topic.form != "to":
                continue
            elif isinstance(msg, Join):
                if msg.run != self.run_id:
                    continue
                await messenger.send(sender, Ack(run=self.run_id, sender=self.id, ref=msg.id))
                self._joined.add(sender)
                if self._joined >= set(self.settings.children):
                    self._children_in.set()
                event = NodeJoined(node=sender, num_examples=msg.num_examples)
            elif isinstance(msg, ModelUpdate):
                event = UpdateReceived(
                    sender=sender, run=RunId(msg.run), round=msg.round,
                    weights=tensors_to_arrays(msg.weights), num_examples=msg.num_examples,
                    encoding=msg.encoding, metrics=msg.metrics, update_id=msg.id,
                    reply_to=msg.reply_to,
                )  # fmt: skip
            elif isinstance(msg, UpdateFailure):
                event = UpdateFailed(
                    sender=sender, run=RunId(msg.run), round=msg.round, reason=msg.reason,
                    update_id=msg.id,
                )  # fmt: skip
            if event is not None:
                driver.post(event)

    # -- parent -------------------------------------------------------------------------

    async def _join_parent(self, messenger: Messenger) -> None:
        s = self.settings
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(s.join_timeout_s):
                await self._children_in.wait()
        wait_s = s.join_backoff_s
        for _ in range(s.join_attempts):
            join = Join(run=self.run_id, sender=self.id, role="edge", num_examples=0)
            self._join_ids.add(join.id)
            with contextlib.suppress(FedbusError):
                await messenger.send(s.parent, join)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._confirmed.wait()
                    return
            wait_s = min(8.0, wait_s * 2)
        log.warning("%s: no answer from %s to %d joins", self.id, s.parent, s.join_attempts)

    async def _receive_up(self, driver: Driver, messenger: Messenger) -> None:
        async for _topic, msg in messenger.messages():
            event: Event | None = None
            if isinstance(msg, Ack):
                if msg.ref in self._join_ids:
                    self._confirmed.set()
            elif msg.run != self.run_id:
                continue
            elif isinstance(msg, Manifest):
                if confirms_join(self.id, msg.selected):
                    self._confirmed.set()
                event = ManifestReceived(run=RunId(msg.run), round=msg.round, state=msg.state)
            elif isinstance(msg, ModelBroadcast):
                if self._faults is not None and self._faults.crashes(msg.round):
                    log.info("%s: simulated crash at round %d", self.id, msg.round)
                    self._crashed = True
                    driver.stop()
                    return
                selected = is_selected(self.id, msg.selected)
                if confirms_join(self.id, msg.selected):
                    self._confirmed.set()
                top = msg.config.get("top_round", msg.round)
                self._top_round[msg.round] = top if isinstance(top, int) else msg.round
                event = ModelReceived(
                    run=RunId(msg.run), round=msg.round, weights=tensors_to_arrays(msg.weights),
                    selected=selected, config=msg.config, model_id=msg.id,
                )  # fmt: skip
            if event is not None:
                driver.post(event)

    # -- commands ------------------------------------------------------------------------

    def _compact(self, selected: Sequence[str]) -> list[str]:
        """``["*"]`` when ``selected`` is every child live at the inner server (issue 3)."""
        inner = self.machine.inner
        return compact_selection(selected, inner.live_nodes if inner is not None else ())

    async def _execute(self, command: Command) -> bool:
        up, down = self._up, self._down
        assert up is not None
        assert down is not None
        match command:
            case BroadcastModel():
                await down.broadcast(
                    ModelBroadcast(
                        run=self.run_id, round=command.round, sender=self.id,
                        id=_bounded_id(command.request_id),
                        weights=tensors_from_arrays(command.weights),
                        config=dict(command.config),
                        selected=self._compact(command.selected),
                    ),
                    MODEL_CHANNEL,
                )  # fmt: skip
            case PublishManifest():
                manifest = Manifest(
                    run=command.run, round=command.round, sender=self.id, state=command.state,
                    attempt=command.attempt, completed_round=command.completed_round,
                    selected=self._compact(command.selected),
                )  # fmt: skip
                await down.broadcast(manifest, MANIFEST_CHANNEL, retain=True)
            case Reject():
                log.debug("%s: rejected %s (round %d): %s", self.id, command.sender,
                          command.round, command.reason)  # fmt: skip
                if command.update_id:
                    ack = Ack(
                        run=self.run_id, round=command.round, sender=self.id,
                        ref=command.update_id, status="rejected", detail=command.reason,
                    )  # fmt: skip
                    await down.send(command.sender, ack)
            case RoundClosed():
                self._observer.on_local_round(self.id, command)
            case RoundFailed():
                log.info("%s: local round %d attempt %d failed: %s", self.id, command.round,
                         command.attempt, command.reason)  # fmt: skip
            case SendUpdate():
                top = self._top_round.get(command.round, command.round)
                self._observer.on_task_done(self.id, top, command)
                update = ModelUpdate(
                    run=self.run_id, round=command.round, sender=self.id,
                    weights=tensors_from_arrays(command.weights),
                    num_examples=command.num_examples, encoding=command.encoding,
                    reply_to=command.reply_to, metrics=_scalars(command.metrics),
                )  # fmt: skip
                await up.send(self.settings.parent, update)
            case SendFailure():
                failure = UpdateFailure(
                    run=self.run_id, round=command.round, sender=self.id,
                    reason=command.reason[:256], reply_to=command.reply_to,
                )  # fmt: skip
                await up.send(self.settings.parent, failure)
            case Stop():
                log.info("%s: %s", self.id, command.reason)
                return True
            case _:
                log.debug("%s: %s", self.id, command)
        return False


def _bounded_id(request_id: str) -> str:
    """The machine's ``<edge>:<request>`` id, hashed if beyond the wire's 128 characters."""
    if len(request_id) <= 128:
        return request_id
    return hashlib.sha256(request_id.encode()).hexdigest()[:32]

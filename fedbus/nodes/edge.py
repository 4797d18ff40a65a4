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

Re-homing (an edge under a region). The edge watches its parent's ``leave``
topic in the parent's namespace and in the namespace where the parent's own
will goes (``settings.watch``, as devices do); a Leave from the parent is a
`ParentLost` for the machine, whose `SwitchParent` makes the runtime send a
best-effort Leave to the old parent, close the upward messenger, open one
in the new parent's namespace on the same upward connection, subscribe and
Join there (the Leave goes to the old parent directly: a broadcast one in
its namespace is where this edge's will goes, and its children would take
it for its death); its children and its down side are untouched. Only fallbacks
whose children share the upward connection's broker are reachable
(``settings.namespaces``); a fallback on another broker leaves the edge
stranded (logged). The connection's will stays the one set at connect time
(a Leave in the first parent's namespace): the new parent learns of this
edge's death by its round deadlines, the children still by the will.

Per-level reports. Each `TaskEnded` of the machine (one per parent round:
local rounds, participants, rejections by reason, the children's federated
evaluation, the restart point) goes to the observer's ``on_task_ended``;
the launcher merges them into the cloud's metrics rows and writes them as
this edge's checkpoint (`fedbus.nodes.edge_checkpoint`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from fedbus import codec, topics
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
from fedbus.nodes.driver import Driver
from fedbus.nodes.edge_support import (
    EdgeObserver,
    EdgeOutcome,
    EdgeSettings,
    bounded_id,
    namespace_of,
)
from fedbus.nodes.faults import FaultPlan
from fedbus.nodes.namespaces import NamespaceView
from fedbus.nodes.server import LEAVE_CHANNEL, MANIFEST_CHANNEL, MODEL_CHANNEL
from fedbus.nodes.shared_views import scalars
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
from fedbus.protocols.hierarchical import EdgeAggregator, TaskEnded
from fedbus.protocols.hierarchical_rehoming import ParentLost, Stranded, SwitchParent
from fedbus.transport.base import Transport
from fedbus.transport.messenger import Messenger

__all__ = ["EdgeNode", "EdgeObserver", "EdgeOutcome", "EdgeSettings", "namespace_of"]

log = logging.getLogger(__name__)


class EdgeNode:
    """The edge aggregator runtime (see the module docstring).

    Args:
        machine: the edge machine (its run id is the run's).
        up: the connection toward the parent (a view or a transport, entered by the caller).
        down: the connection toward the children (idem).
        settings: identity, parent and namespaces.
        faults: simulated faults (a crash); None injects none.
        observer: per-level callbacks.
        views: the upward connection's view of a namespace (re-homing and
            watching the parent's will); None: neither.
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
        views: Callable[[str], NamespaceView] | None = None,
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
        self._views = views
        self.parent = settings.parent
        """The parent in force (changes when this edge re-homes)."""
        self.parents: list[str] = [settings.parent]
        """Every parent so far, the current one last."""
        self._up_exit = contextlib.AsyncExitStack()
        self._up_tasks: set[asyncio.Task[None]] = set()
        self._driver: Driver | None = None

    async def run(self) -> EdgeOutcome:
        """Serve until the parent finishes the run (or a simulated crash); never raises."""
        try:
            return await self._run()
        except Exception as exc:  # the node runtime boundary (STYLE.md section 6)
            log.exception("node %s failed", self.id)
            return EdgeOutcome(self.id, "failed", f"{type(exc).__name__}: {exc}")

    async def _run(self) -> EdgeOutcome:
        s = self.settings
        async with Messenger(
            self._down_transport, node_id=self.id, run=s.down_namespace, strict_run=False
        ) as down:
            self._down = down
            await down.subscribe_broadcasts(None, LEAVE_CHANNEL)
            if not s.children:
                self._children_in.set()
            driver = self._driver = Driver(self.machine, self._execute, clock=self._clock)
            try:
                await self._open_up(driver, s.parent, self._up_transport, s.up_namespace)
                async with asyncio.TaskGroup() as tg:
                    receiver = tg.create_task(
                        self._receive_down(driver, down), name=f"fedbus[{self.id}].down"
                    )
                    await driver.feed(Started())
                    await driver.run()
                    receiver.cancel()
            finally:
                for task in [*self._tasks, *self._up_tasks]:
                    task.cancel()
                await asyncio.gather(*self._tasks, *self._up_tasks, return_exceptions=True)
                await self._up_exit.aclose()
            if not self._crashed:
                with contextlib.suppress(Exception):  # best effort: the run is over either way
                    async with asyncio.timeout(5.0):
                        await down.clear_retained(MANIFEST_CHANNEL)
        if self._crashed:
            return EdgeOutcome(self.id, "crashed", "simulated crash")
        return EdgeOutcome(self.id, "finished")

    def _spawn(self, coro: Any, what: str, tasks: set[asyncio.Task[None]] | None = None) -> None:
        group = self._tasks if tasks is None else tasks
        task: asyncio.Task[None] = asyncio.create_task(coro, name=f"fedbus[{self.id}].{what}")
        group.add(task)
        task.add_done_callback(group.discard)

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

    async def _open_up(
        self, driver: Driver, parent: str, transport: Transport, namespace: str
    ) -> None:
        """Toward ``parent``: a messenger in its namespace, its will watched, a Join sent."""
        up = await self._up_exit.enter_async_context(
            Messenger(transport, node_id=self.id, run=namespace, strict_run=False)
        )
        self._up = up
        for channel in (MANIFEST_CHANNEL, MODEL_CHANNEL, LEAVE_CHANNEL):
            await up.subscribe_broadcasts(parent, channel)
        for ns in self.settings.watch.get(parent, ()):
            if ns == namespace or self._views is None:
                continue
            view = self._views(ns)
            await view.subscribe(topics.broadcast(ns, parent, LEAVE_CHANNEL))
            self._spawn(self._watch(driver, view, parent), "watch", self._up_tasks)
        self._spawn(self._receive_up(driver, up, parent), "up", self._up_tasks)
        self._confirmed = asyncio.Event()
        self._spawn(self._join_parent(up, parent), "join", self._up_tasks)

    async def _switch(self, command: SwitchParent) -> None:
        """Re-home upward to ``command.parent`` (see the module docstring)."""
        namespace = self.settings.namespaces.get(command.parent)
        old = self._up
        if old is not None:
            # Sent to the old parent, not broadcast: our children read a broadcast Leave of
            # ours in that namespace as our death (our will goes there) and would re-home.
            with contextlib.suppress(FedbusError):  # best effort: the old parent is usually dead
                leave = Leave(run=self.run_id, sender=self.id, reason="re-homing")
                await old.send(command.previous, leave)
        tasks, self._up_tasks = list(self._up_tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._up_exit.aclose()
        self._up_exit = contextlib.AsyncExitStack()
        self._up, self._top_round = None, {}
        if namespace is None or self._views is None or self._driver is None:
            log.warning("%s: cannot reach %s over its upward connection; stranded",
                        self.id, command.parent)  # fmt: skip
            return
        log.info("%s: re-homing from %s to %s: %s", self.id, command.previous, command.parent,
                 command.reason)  # fmt: skip
        self.parent = command.parent
        self.parents.append(command.parent)
        view = self._views(namespace)
        await self._open_up(self._driver, command.parent, view, namespace)

    async def _watch(self, driver: Driver, view: NamespaceView, parent: str) -> None:
        async for received in view.messages():
            if not received.payload:
                continue
            with contextlib.suppress(Exception):  # not a fedbus message: ignore it
                msg = codec.decode(received.payload)
                if isinstance(msg, Leave) and msg.sender == parent:
                    driver.post(ParentLost(parent=NodeId(parent), reason=msg.reason or "left"))

    async def _join_parent(self, messenger: Messenger, parent: str) -> None:
        s = self.settings
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(s.join_timeout_s):
                await self._children_in.wait()
        wait_s = s.join_backoff_s
        for _ in range(s.join_attempts):
            join = Join(run=self.run_id, sender=self.id, role="edge", num_examples=0)
            self._join_ids.add(join.id)
            with contextlib.suppress(FedbusError):
                await messenger.send(parent, join)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._confirmed.wait()
                    return
            wait_s = min(8.0, wait_s * 2)
        log.warning("%s: no answer from %s to %d joins", self.id, parent, s.join_attempts)

    async def _receive_up(self, driver: Driver, messenger: Messenger, parent: str) -> None:
        async for _topic, msg in messenger.messages():
            event: Event | None = None
            if isinstance(msg, Leave):
                if msg.sender == parent:
                    event = ParentLost(parent=NodeId(parent), reason=msg.reason or "left")
            elif isinstance(msg, Ack):
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
        assert down is not None
        match command:
            case BroadcastModel():
                await down.broadcast(
                    ModelBroadcast(
                        run=self.run_id, round=command.round, sender=self.id,
                        id=bounded_id(command.request_id),
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
            case TaskEnded():
                self._observer.on_task_ended(self.id, command)
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
                    reply_to=command.reply_to, metrics=scalars(command.metrics),
                )  # fmt: skip
                if up is not None:  # None: stranded after a failed re-homing
                    await up.send(self.parent, update)
            case SendFailure():
                failure = UpdateFailure(
                    run=self.run_id, round=command.round, sender=self.id,
                    reason=command.reason[:256], reply_to=command.reply_to,
                )  # fmt: skip
                if up is not None:
                    await up.send(self.parent, failure)
            case SwitchParent():
                await self._switch(command)
            case Stranded():
                log.warning("%s: %s", self.id, command.reason)
            case Stop():
                log.info("%s: %s", self.id, command.reason)
                return True
            case _:
                log.debug("%s: %s", self.id, command)
        return False

"""`DeviceNode`: a device under an edge, running a `HierarchicalClient` that re-homes.

Like `fedbus.nodes.client.ClientNode` (same messages, joins with backoff,
training in a worker thread), but its parent is an edge (or, after
re-homing, the cloud), in the parent's namespace on the parent's children's
broker. Each connection goes to one parent and carries a will (a Leave in
that parent's namespace).

Detecting a dead parent. An edge whose upward and downward sides share one
connection has a single will, published in *its* parent's namespace; an edge
with its own broker has a will in its own namespace there. The device
watches the parent's ``leave`` topic in both (a `SharedConnection` view for
the second), and either one is a `ParentLost`. The machine's watchdog
(``parent_timeout_s``) remains a backstop.

Re-homing. On `SwitchParent` the device broadcasts a Leave in the old
namespace (best effort: the old parent is usually dead), ends the driver at
once (events still queued for the old parent must not reach the fresh
client), closes the connection cleanly and connects to the new parent's
broker with a will in the new namespace, then Joins there. The machine keeps
its accounting gate, so a top-level round trained for through the old
parent is not answered again through the new one. ``trained`` records
``(top round, parent)`` for every training started, which is what the
accounting tests check.

A simulated attacker (``attack``) forges its updates in the top-level rounds
its attack is active in (`fedbus.nodes.device_support.device_work`). Under
``protocol.evaluate: federated`` the device evaluates the model it receives
when the broadcast asks for it, as a centralized client does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Literal

from fedbus import codec, topics
from fedbus._types import NodeId, RunId
from fedbus.errors import FedbusError
from fedbus.learning.trainer import Trainer
from fedbus.messages import (
    Ack,
    Join,
    Leave,
    Manifest,
    ModelBroadcast,
    ModelUpdate,
    UpdateFailure,
    confirms_join,
    is_selected,
    tensors_from_arrays,
    tensors_to_arrays,
)
from fedbus.nodes.client import ClientOutcome, LocalAttack
from fedbus.nodes.device_support import ConnectTo, DeferredMachine, DeviceSettings, device_work
from fedbus.nodes.driver import Driver
from fedbus.nodes.faults import FaultPlan
from fedbus.nodes.namespaces import NamespaceView, SharedConnection
from fedbus.nodes.server import LEAVE_CHANNEL, MANIFEST_CHANNEL, MODEL_CHANNEL
from fedbus.nodes.shared_views import scalars
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg import (
    CancelTraining,
    Evaluate,
    ManifestReceived,
    ModelReceived,
    SendFailure,
    SendUpdate,
    Started,
    Stop,
    Train,
)
from fedbus.protocols.hierarchical_client import HierarchicalClient
from fedbus.protocols.hierarchical_rehoming import (
    TOP_ROUND_KEY,
    ParentLost,
    Rehoming,
    Stranded,
    SwitchParent,
)
from fedbus.transport.base import Will
from fedbus.transport.messenger import Messenger

__all__ = ["ConnectTo", "DeviceNode", "DeviceSettings"]

log = logging.getLogger(__name__)

_Exit = Literal["", "crash", "churn", "rehome"]


class DeviceNode:
    """The device runtime (see the module docstring).

    Args:
        trainer: local training and evaluation.
        connect: builds a connection toward a given parent.
        settings: identity, parents, re-homing.
        run: the run id (None: learnt from the first parent manifest).
        faults: simulated faults (crash, dropout, churn; rounds are top-level rounds).
        attack: simulation only: forges this device's updates; None is honest.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        trainer: Trainer,
        connect: ConnectTo,
        settings: DeviceSettings,
        *,
        run: RunId | None = None,
        faults: FaultPlan | None = None,
        attack: LocalAttack | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.trainer = trainer
        self._attack = attack
        self.settings = settings
        self.id = settings.node_id
        self._connect = connect
        self._faults = faults if faults is not None and faults.active else None
        self._clock = clock
        data = getattr(trainer, "train", None)
        self._num_examples = len(data) if data is not None else 0
        self.parent = settings.parent
        self.machine: HierarchicalClient | None = None
        self._driver: Driver | None = None
        self._exit: _Exit = ""
        self._next_parent = ""
        self._down_rounds = 0
        self._seen_top = 0
        self._confirmed = asyncio.Event()
        self._join_ids: set[str] = set()
        self._joined = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._work: asyncio.Task[None] | None = None
        self._messenger: Messenger | None = None
        self._model_top: dict[int, int] = {}
        self._model_selected: dict[int, list[str]] = {}
        self.trained: list[tuple[int, str]] = []
        """(top-level round, parent) of every training started."""
        self.parents: list[str] = [settings.parent]
        """Every parent so far, the current one last."""
        if run is not None:
            self._create(run)

    def _create(self, run: RunId) -> None:
        rehome = self.settings.rehome
        rehoming = None if rehome is None else Rehoming(rehome, parent=NodeId(self.parent))
        self.machine = HierarchicalClient(run=run, rehoming=rehoming)

    async def run(self) -> ClientOutcome:
        """Take part until the run finishes (or a simulated crash); never raises."""
        try:
            while True:
                status = await self._connection(self.parent)
                if status == "rehome":
                    self.parent = self._next_parent
                    self.parents.append(self.parent)
                    log.info("%s: re-homed to %s", self.id, self.parent)
                    continue
                if status == "churn":
                    await asyncio.sleep(self._down_rounds * self.settings.round_hint_s)
                    continue
                return ClientOutcome(self.id, status)
        except Exception as exc:  # the node runtime boundary (STYLE.md section 6)
            log.exception("node %s failed", self.id)
            return ClientOutcome(self.id, "failed", f"{type(exc).__name__}: {exc}")

    async def _connection(self, parent: str) -> Literal["finished", "crashed", "churn", "rehome"]:
        s = self.settings
        namespace = s.namespaces[parent]
        leave = Leave(run=namespace, sender=self.id, reason="connection lost")
        will = Will(
            topic=topics.broadcast(namespace, self.id, LEAVE_CHANNEL), payload=codec.encode(leave)
        )
        shared = SharedConnection(self._connect(parent, will))
        main = shared.view(namespace)
        watches = [shared.view(ns) for ns in s.watch.get(parent, ()) if ns != namespace]
        self._exit, self._joined = "", False
        async with shared:
            try:
                async with Messenger(
                    main, node_id=self.id, run=namespace, strict_run=False
                ) as messenger:
                    self._messenger = messenger
                    for channel in (MANIFEST_CHANNEL, MODEL_CHANNEL, LEAVE_CHANNEL):
                        await messenger.subscribe_broadcasts(parent, channel)
                    for view in watches:
                        await view.subscribe(
                            topics.broadcast(view.namespace, parent, LEAVE_CHANNEL)
                        )
                        self._spawn(self._watch(view, parent), "watch")
                    await self._drive(messenger, parent)
            except BaseException:
                await shared.abort()
                raise
            finally:
                await self._cancel_tasks()
                self._messenger = None
            status = self._exit_status()
            if status in ("crash", "churn"):
                await shared.abort()
                return "crashed" if status == "crash" else "churn"
        return "rehome" if status == "rehome" else "finished"

    def _exit_status(self) -> _Exit:
        """Why the connection ended ('' when the run finished); set by the tasks."""
        return self._exit

    async def _drive(self, messenger: Messenger, parent: str) -> None:
        machine = DeferredMachine(lambda: self.machine)
        driver = self._driver = Driver(machine, self._execute, clock=self._clock)
        async with asyncio.TaskGroup() as tg:
            receiver = tg.create_task(
                self._receive(driver, messenger, parent), name=f"fedbus[{self.id}].receive"
            )
            if self.machine is not None:
                self._start_joining(messenger, parent)
                if len(self.parents) == 1:
                    await driver.feed(Started())
            await driver.run()
            receiver.cancel()

    # -- messages -> events --------------------------------------------------------

    async def _receive(self, driver: Driver, messenger: Messenger, parent: str) -> None:
        async for _topic, msg in messenger.messages():
            event: Event | None = None
            if isinstance(msg, Leave):
                if msg.sender == parent:
                    event = ParentLost(parent=NodeId(parent), reason=msg.reason or "left")
            elif isinstance(msg, Ack):
                if msg.ref in self._join_ids:
                    self._confirmed.set()
            elif isinstance(msg, Manifest):
                event = await self._on_manifest(msg, driver, messenger, parent)
            elif isinstance(msg, ModelBroadcast):
                event = self._on_model(msg)
            if self._exit:
                driver.stop()
                return
            if event is not None:
                driver.post(event)

    async def _on_manifest(
        self, msg: Manifest, driver: Driver, messenger: Messenger, parent: str
    ) -> Event | None:
        if self.machine is None:
            if msg.state == "finished":
                return None
            self._create(RunId(msg.run))
            self._start_joining(messenger, parent)
            await driver.feed(Started())
        assert self.machine is not None
        if msg.run != self.machine.upstream.run:
            return None
        if confirms_join(self.id, msg.selected):
            self._confirmed.set()
        return ManifestReceived(run=RunId(msg.run), round=msg.round, state=msg.state)

    def _on_model(self, msg: ModelBroadcast) -> Event | None:
        if self.machine is None or msg.run != self.machine.upstream.run:
            return None
        selected = is_selected(self.id, msg.selected)
        if confirms_join(self.id, msg.selected):
            self._confirmed.set()
        top = msg.config.get(TOP_ROUND_KEY, msg.round)
        top_round = top if isinstance(top, int) and not isinstance(top, bool) else msg.round
        self._model_top[msg.round] = top_round
        self._model_selected = {msg.round: msg.selected}  # the attack's view of the round
        self._check_faults(top_round)
        return ModelReceived(
            run=RunId(msg.run), round=msg.round, weights=tensors_to_arrays(msg.weights),
            selected=selected, config=msg.config, model_id=msg.id,
        )  # fmt: skip

    async def _watch(self, view: NamespaceView, parent: str) -> None:
        async for received in view.messages():
            if not received.payload:
                continue
            with contextlib.suppress(Exception):  # not a fedbus message: ignore it
                msg = codec.decode(received.payload)
                if isinstance(msg, Leave) and msg.sender == parent and self._driver is not None:
                    self._driver.post(
                        ParentLost(parent=NodeId(parent), reason=msg.reason or "left")
                    )

    def _check_faults(self, top_round: int) -> None:
        faults = self._faults
        if faults is None or top_round <= self._seen_top:
            return
        self._seen_top = top_round
        if faults.crashes(top_round):
            log.info("%s: simulated crash at round %d", self.id, top_round)
            self._exit = "crash"
        elif down := faults.leaves(top_round):
            self._exit, self._down_rounds = "churn", down

    def _start_joining(self, messenger: Messenger, parent: str) -> None:
        if self._joined or self.machine is None:
            return
        self._joined = True
        self._confirmed = asyncio.Event()
        self._spawn(self._join(messenger, parent, self.machine.upstream.run), "join")

    async def _join(self, messenger: Messenger, parent: str, run: RunId) -> None:
        wait_s = self.settings.join_backoff_s
        for _ in range(self.settings.join_attempts):
            join = Join(run=run, sender=self.id, num_examples=self._num_examples)
            self._join_ids.add(join.id)
            with contextlib.suppress(FedbusError):
                await messenger.send(parent, join)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._confirmed.wait()
                    return
            wait_s = min(8.0, wait_s * 2)
        log.warning(
            "%s: no answer from %s to %d joins", self.id, parent, self.settings.join_attempts
        )

    # -- commands ----------------------------------------------------------------------

    async def _execute(self, command: Command) -> bool:
        messenger, machine = self._messenger, self.machine
        assert messenger is not None
        assert machine is not None
        run = machine.upstream.run
        match command:
            case Train() | Evaluate():
                if self._faults is not None and self._faults.drops(command.round):
                    return False
                top = self._model_top.get(command.round, command.round)
                if isinstance(command, Train):
                    self.trained.append((top, self.parent))
                work = device_work(
                    self.trainer, command, self.settings, self._post, attack=self._attack,
                    top_round=top, selected=self._model_selected.get(command.round, []),
                    parent=self.parent,
                )  # fmt: skip
                self._work = self._spawn(work, "train")
            case CancelTraining():
                if self._work is not None:
                    self._work.cancel()
                    self._work = None
            case SendUpdate():
                update = ModelUpdate(
                    run=run, round=command.round, sender=self.id,
                    weights=tensors_from_arrays(command.weights), num_examples=command.num_examples,
                    encoding=command.encoding, reply_to=command.reply_to,
                    metrics=scalars(command.metrics),
                )  # fmt: skip
                await messenger.send(self.parent, update)
            case SendFailure():
                failure = UpdateFailure(
                    run=run, round=command.round, sender=self.id,
                    reason=command.reason[:256], reply_to=command.reply_to,
                )  # fmt: skip
                await messenger.send(self.parent, failure)
            case SwitchParent():
                log.info("%s: re-homing from %s to %s: %s", self.id, command.previous,
                         command.parent, command.reason)  # fmt: skip
                self._next_parent, self._exit = command.parent, "rehome"
                with contextlib.suppress(FedbusError):
                    leave = Leave(run=run, sender=self.id, reason="re-homing")
                    await messenger.broadcast(leave, LEAVE_CHANNEL)
                return True  # end this driver now: nothing queued for the old parent may follow
            case Stranded():
                log.warning("%s: %s", self.id, command.reason)
            case Stop():
                log.info("%s: %s", self.id, command.reason)
                return True
        return False

    def _post(self, event: Event) -> None:
        if self._driver is not None:
            self._driver.post(event)

    def _spawn(self, coro: object, what: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=f"fedbus[{self.id}].{what}")  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._work = None

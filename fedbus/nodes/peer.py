"""`PeerNode`: runs a gossip peer machine (`GossipPeer` or `PushSumPeer`) over a transport.

There is no server. Each peer talks to its graph neighbours only, in the
federation's namespace (the topology name):

- announcing: a ``Join`` directed at each neighbour, repeated with backoff
  until that neighbour answers (an ``Ack``, or a ``Join`` of its own); each
  Join or Ack of our run from a neighbour is a `NeighbourJoined`;
- models: one ``ModelUpdate`` per addressee of a `SendModel` (directed
  topics, so a peer receives exactly its in-neighbours' models), carrying the
  sender's graph ``degree`` and push-sum ``mass`` in its metrics map;
- leaving: every connection carries a last will, a ``Leave`` on the peer's
  ``leave`` channel, to which its neighbours subscribe; a Leave (will or the
  clean one sent after the last round) is a `NeighbourLost`.

Run id. Peers started by ``fedbus run`` are given it. A ``fedbus node``
agent that is not learns it from the first neighbour that answers (its Joins
carry the namespace as a placeholder run, which no real run id equals, so
nobody counts them); its machine is built then.

Training runs in a worker thread (``asyncio.to_thread``) in a task of its
own; the result comes back through the driver. Simulated faults are decided
when a round's training starts: a crash aborts the connection for good;
churn aborts it (the will tells the neighbours), keeps the machine as it is,
and once its neighbours have run ``down_rounds`` rounds without it (or, with
no view of their rounds, after ``down_rounds`` rounds' worth of time;
`PeerNode._stay_away`) reconnects, announces itself again and waits briefly
for the neighbours' answers. A synchronous peer
then resynchronises (`Rejoined`: the neighbours that answered each send a
snapshot of their current model, flagged ``sync`` in the ModelUpdate's
metrics; the machine adopts their average and goes on at their round); a
push-sum peer redoes the training it skipped.

Lingering. A peer that finished while a neighbour was away (its will came,
no clean Leave, no Join since) keeps its connection up to ``linger_s`` to
answer that neighbour's rejoin with its final model, so a peer back after
the others finished catches up instead of training alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fedbus import codec, topics
from fedbus._types import NodeId, RunId
from fedbus.errors import FedbusError
from fedbus.learning.trainer import Trainer
from fedbus.messages import Ack, Join, Leave, ModelUpdate
from fedbus.nodes.client import Connect
from fedbus.nodes.driver import Driver
from fedbus.nodes.faults import FaultPlan
from fedbus.nodes.namespaces import abort_transport
from fedbus.nodes.peer_types import (
    MachineFactory,
    PeerMachine,
    PeerObserver,
    PeerOutcome,
    PeerSettings,
    completed_rounds,
)
from fedbus.nodes.peer_wire import PeerAttack, model_event, model_update
from fedbus.nodes.server import LEAVE_CHANNEL
from fedbus.nodes.training import run_local_work
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg import Finish, Reject, Started, Train
from fedbus.protocols.gossip import GossipPeer
from fedbus.protocols.gossip_types import (
    NeighbourDropped,
    NeighbourJoined,
    NeighbourLost,
    Rejoined,
    RoundMixed,
    SendModel,
)
from fedbus.transport.base import Will
from fedbus.transport.messenger import Messenger

__all__ = ["PeerMachine", "PeerNode", "PeerObserver", "PeerOutcome", "PeerSettings"]

log = logging.getLogger(__name__)


class PeerNode:
    """The gossip peer runtime (see the module docstring).

    Args:
        make_machine: builds the machine once the run id is known.
        trainer: local training on this peer's data.
        connect: builds this node's connection carrying a will (again after churn).
        settings: identity and neighbours.
        run: the run id, when known in advance.
        faults: simulated faults; None injects none.
        observer: the monitor's callbacks.
        progress: ``progress(r, neighbours)`` returns once one of ``neighbours``
            still running has completed round ``r``, or none is running
            (simulation: how long churn keeps the peer away); None measures by
            the peer's own round length.
        clock: monotonic seconds.
        attack: what this peer sends instead of its honest models (a simulated
            Byzantine peer); None for an honest one.
    """

    def __init__(
        self,
        make_machine: MachineFactory,
        trainer: Trainer,
        connect: Connect,
        settings: PeerSettings,
        *,
        run: RunId | None = None,
        faults: FaultPlan | None = None,
        observer: PeerObserver | None = None,
        progress: Callable[[int, frozenset[str]], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        attack: PeerAttack | None = None,
    ) -> None:
        self.settings = settings
        self._attack = attack
        self._round_start: tuple[int, Any] = (0, None)  # (round, model its training started from)
        self._progress = progress
        self.id = settings.node_id
        self.trainer = trainer
        self._make = make_machine
        self._connect = connect
        self._faults = faults if faults is not None and faults.active else None
        self._observer = observer or PeerObserver()
        self._clock = clock
        self._neighbours = frozenset(settings.neighbours)
        data = getattr(trainer, "train", None)
        self._num_examples = len(data) if data is not None else 0
        self.machine: PeerMachine | None = None
        self._driver: Driver | None = None
        self._early: list[Event] = []
        self._have_run = asyncio.Event()
        self._confirmed: set[str] = set()
        self._all_confirmed = asyncio.Event()
        self._any_confirmed = asyncio.Event()
        self._messenger: Messenger | None = None
        self._exit: Literal["", "crash", "churn"] = ""
        self._down_rounds = 0
        self._pending: Train | None = None
        self._work: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._finish: Finish | None = None
        self._round_s = settings.round_hint_s
        self._mixed_at: float | None = None
        self._checked_round = 0
        self._connected_once = False
        self._away_neighbours: set[str] = set()
        self._no_one_away = asyncio.Event()
        self._no_one_away.set()
        self.away = False
        """True while churn keeps the peer disconnected."""
        if run is not None:
            self._adopt(run)

    @property
    def run_id(self) -> RunId | None:
        """The run id (None until learnt)."""
        return None if self.machine is None else self.machine.run

    # -- running -------------------------------------------------------------------

    async def run(self) -> PeerOutcome:
        """Take part until the last round, a simulated crash or an error; never raises."""
        try:
            while True:
                status = await self._connection()
                if status != "churn":
                    return self._outcome(status)
                self.away = True
                self._observer.on_gone(self.id, "away")
                await self._stay_away()
                self.away = False
        except Exception as exc:  # the node runtime boundary (STYLE.md section 6)
            log.exception("node %s failed", self.id)
            return self._outcome("failed", f"{type(exc).__name__}: {exc}")

    async def _stay_away(self) -> None:
        """Churn: skip ``down_rounds`` rounds of the neighbours, by their clock or ours.

        The peer left when round ``left`` started, so it skips rounds
        ``left`` to ``left + down_rounds - 1``. With ``progress`` (the
        launcher's view of the peers' rounds) it reconnects once one of its
        neighbours still running has completed the last of them (or none is
        running), so that it is back for round ``left + down_rounds``; at the
        latest after ``down_rounds`` times three of its own observed round
        lengths (capped at the round deadline). Without ``progress``, after
        ``down_rounds`` times its own observed round length. The round it
        comes back for is drawn for churn now (`_check_faults` does not draw
        it again): if the peer leaves again it simply stays away, rather than
        reconnect, resync and disconnect at once.

        Why the neighbours' clock: rounds take milliseconds on the in-process
        bus, so away time counted by the network's median round (or by time)
        let a reconnection land rounds late, and peers that happen to be
        present ran ahead of their away neighbours (see
        docs/hierarchical-gossip.md, "Churn"). Measured with 20% churn on 16
        peers, 4.0 to 6.0 peers were away per round instead of about 2.7.
        Why the short bound: a peer whose neighbours are all away waits for
        its round deadline rather than run ahead alone, so its away
        neighbours may wait for it in turn.
        """
        progress = self._progress
        if progress is None:
            down_s = self._down_rounds * self._round_s
            log.info("%s: churn: away for %d round(s) (%.2f s)", self.id, self._down_rounds, down_s)
            await asyncio.sleep(down_s)
            return
        left, rounds = self._checked_round, self._down_rounds
        last = self.machine.config.rounds if self.machine is not None else left
        while True:
            log.info("%s: churn: away for %d round(s) from round %d", self.id, rounds, left)
            round_s = min(self.settings.round_timeout_s, 3.0 * self._round_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(rounds * round_s):
                    await progress(min(left + rounds - 1, last), self._neighbours)
            back = left + rounds
            if back > last or self._faults is None or back <= self._checked_round:
                return
            if self._faults.crashes(back):
                return  # it crashes when that round starts (`_check_faults`)
            self._checked_round = back  # drawn here, once
            down = self._faults.leaves(back)
            if not down:
                return
            left, rounds = back, down

    def _outcome(
        self, status: Literal["finished", "crashed", "failed"], reason: str = ""
    ) -> PeerOutcome:
        done = 0 if self.machine is None else completed_rounds(self.machine)
        if self._finish is not None and not reason:
            reason = self._finish.reason
        self._observer.on_gone(self.id, status)
        return PeerOutcome(self.id, status, reason, done)

    def _will(self) -> Will:
        topic = topics.broadcast(self.settings.namespace, self.id, LEAVE_CHANNEL)
        leave = Leave(run=self.settings.namespace, sender=self.id, reason="connection lost")
        return Will(topic=topic, payload=codec.encode(leave))

    async def _connection(self) -> Literal["finished", "crashed", "churn"]:
        self._exit = ""
        first, self._connected_once = not self._connected_once, True
        self._confirmed.clear()
        self._all_confirmed = asyncio.Event()
        self._any_confirmed = asyncio.Event()
        if not self._neighbours:
            self._all_confirmed.set()
        transport = self._connect(self._will())
        async with transport:
            try:
                async with Messenger(
                    transport, node_id=self.id, run=self.settings.namespace, strict_run=False
                ) as messenger:
                    self._messenger = messenger
                    for neighbour in sorted(self._neighbours):
                        await messenger.subscribe_broadcasts(neighbour, LEAVE_CHANNEL)
                    async with asyncio.TaskGroup() as tg:
                        receiver = tg.create_task(
                            self._receive(messenger), name=f"fedbus[{self.id}].receive"
                        )
                        self._spawn(self._announce(messenger), "announce")
                        await self._drive(first)
                        receiver.cancel()
            except BaseException:
                await abort_transport(transport)
                raise
            finally:
                await self._cancel_tasks()
                self._messenger = None
            if self._exit:
                await abort_transport(transport)
                return "crashed" if self._exit == "crash" else "churn"
        return "finished"

    async def _drive(self, first: bool) -> None:
        await self._have_run.wait()  # an agent waits for its run as long as it takes
        driver = self._driver
        assert driver is not None
        if first:
            await driver.feed(Started())
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.rejoin_wait_s):
                    # A synchronous peer resyncs from whoever answers first (the
                    # machine takes later snapshots too); push-sum waits for all.
                    sync = isinstance(self.machine, GossipPeer)
                    await (self._any_confirmed if sync else self._all_confirmed).wait()
            if isinstance(self.machine, GossipPeer):
                self._pending = None  # the machine resyncs, then trains from the mixed model
                answered = frozenset(NodeId(n) for n in self._confirmed)
                await driver.feed(Rejoined(answered=answered))
            elif self._pending is not None:
                pending, self._pending = self._pending, None
                self._start_work(pending)
        if not driver.done:
            await driver.run()
        if self._finish is not None and self._away_neighbours and self.settings.linger_s > 0:
            await self._linger(driver)

    async def _linger(self, driver: Driver) -> None:
        """Answer away neighbours' rejoins for up to ``linger_s`` after the last round."""
        log.debug("%s: lingering for %s", self.id, sorted(self._away_neighbours))
        driver.done = False
        waiter = self._spawn(self._until_no_one_away(driver), "linger")
        await driver.run()
        waiter.cancel()

    async def _until_no_one_away(self, driver: Driver) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.linger_s):
                await self._no_one_away.wait()
        driver.stop()

    def _adopt(self, run: RunId) -> None:
        self.machine = self._make(run)
        self._driver = Driver(self.machine, self._execute, clock=self._clock)
        for event in self._early:
            self._driver.post(event)
        self._early.clear()
        self._have_run.set()

    def _post(self, event: Event) -> None:
        if self._driver is None:
            self._early.append(event)
        else:
            self._driver.post(event)

    # -- messages -> events ----------------------------------------------------------

    async def _receive(self, messenger: Messenger) -> None:
        async for _topic, msg in messenger.messages():
            sender = NodeId(msg.sender)
            if isinstance(msg, Leave):
                if sender in self._neighbours:
                    self._set_away(sender, msg.reason != "finished")
                    self._post(NeighbourLost(node=sender, reason=msg.reason or "left"))
            elif isinstance(msg, Join | Ack):
                await self._on_hello(msg, messenger)
            elif isinstance(msg, ModelUpdate):
                self._post(model_event(msg))

    async def _on_hello(self, msg: Join | Ack, messenger: Messenger) -> None:
        sender = msg.sender
        if sender not in self._neighbours:
            return
        placeholder = self.settings.namespace
        if self.machine is None and msg.run != placeholder:
            log.info("%s: run %s (learnt from %s)", self.id, msg.run, sender)
            self._adopt(RunId(msg.run))
        run = self.run_id
        if isinstance(msg, Join):
            ack = Ack(run=run or placeholder, sender=self.id, ref=msg.id)
            with contextlib.suppress(FedbusError):
                await messenger.send(sender, ack)
        if run is not None and msg.run == run:
            self._confirmed.add(sender)
            self._any_confirmed.set()
            if self._confirmed >= self._neighbours:
                self._all_confirmed.set()
            self._post(NeighbourJoined(node=NodeId(sender), wants_model=isinstance(msg, Join)))

    def _set_away(self, neighbour: str, away: bool) -> None:
        """Track neighbours gone without a clean Leave; back once sent a snapshot."""
        if away:
            self._away_neighbours.add(neighbour)
            self._no_one_away.clear()
        else:
            self._away_neighbours.discard(neighbour)
            if not self._away_neighbours:
                self._no_one_away.set()

    async def _announce(self, messenger: Messenger) -> None:
        wait_s = self.settings.join_backoff_s
        for _ in range(self.settings.join_attempts):
            silent = sorted(self._neighbours - self._confirmed)
            if not silent:
                return
            run = self.run_id or self.settings.namespace
            for neighbour in silent:
                join = Join(run=run, sender=self.id, role="peer", num_examples=self._num_examples)
                with contextlib.suppress(FedbusError):
                    await messenger.send(neighbour, join)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._all_confirmed.wait()
                    return
            wait_s = min(8.0, wait_s * 2)

    # -- commands ----------------------------------------------------------------------

    async def _execute(self, command: Command) -> bool:
        match command:
            case Train():
                self._round_start = (command.round, command.weights)
                if self._check_faults(command.round):
                    self._pending = command
                    assert self._driver is not None
                    self._driver.stop()
                    return False
                self._start_work(command)
            case SendModel():
                await self._send_model(command)
            case RoundMixed():
                now = self._clock()
                if self._mixed_at is not None:
                    self._round_s = max(0.05, 0.7 * self._round_s + 0.3 * (now - self._mixed_at))
                self._mixed_at = now
                self._observer.on_mixed(self.id, command)
            case NeighbourDropped():
                log.debug("%s: dropped %s in round %d: %s", self.id, command.node, command.round,
                          command.reason)  # fmt: skip
            case Reject():
                log.debug("%s: rejected %s (round %d): %s %s", self.id, command.sender,
                          command.round, command.reason, command.detail)  # fmt: skip
            case Finish():
                if self._finish is not None:
                    return True
                self._finish = command
                messenger, run = self._messenger, self.run_id
                if messenger is not None and run is not None:
                    leave = Leave(run=run, sender=self.id, reason="finished")
                    with contextlib.suppress(FedbusError):
                        await messenger.broadcast(leave, LEAVE_CHANNEL)
                return True
        return False

    async def _send_model(self, command: SendModel) -> None:
        messenger, run = self._messenger, self.run_id
        if messenger is None or run is None:
            return
        weights = command.weights
        if self._attack is not None:
            started, start = self._round_start
            base = start if started == command.round and not command.sync else weights
            weights = self._attack.forge(command.round, weights, base) or weights
        update = model_update(
            command, weights, run=run, sender=self.id, num_examples=self._num_examples
        )
        for neighbour in command.to:
            try:
                await messenger.send(neighbour, update)
            except FedbusError as exc:  # a dead receiver of a chunked model: it is dropped later
                log.debug("%s: model of round %d to %s not sent: %s", self.id, command.round,
                          neighbour, exc)  # fmt: skip
            if command.sync:  # its rejoin is answered: a lingering peer need not wait for it
                self._set_away(neighbour, False)

    def _check_faults(self, round_num: int) -> bool:
        """Whether the peer leaves now (crash or churn), decided once per round."""
        faults = self._faults
        if faults is None or round_num <= self._checked_round:
            return False
        self._checked_round = round_num
        if faults.crashes(round_num):
            log.info("%s: simulated crash at round %d", self.id, round_num)
            self._exit = "crash"
            return True
        if down := faults.leaves(round_num):
            self._exit, self._down_rounds = "churn", down
            return True
        return False

    def _start_work(self, command: Train) -> None:
        self._work = self._spawn(
            run_local_work(self.trainer, command, self.id, self.settings.seed, self._post), "train"
        )

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

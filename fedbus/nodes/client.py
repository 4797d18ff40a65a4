"""`ClientNode`: runs a `FedAvgClient` machine over a transport, training in a thread.

Sessions. A client does not know the run id in advance: it subscribes to the
server's retained ``manifest`` and ``model`` channels in the federation's
namespace (the topology name) and learns the run id from the manifest. A new
run id starts a new session: a fresh machine, any training in progress
abandoned, and a Join sent to the server. Joins are repeated with backoff
(the server may not have been listening when one went out) until the server
acknowledges one, or the node is selected in a model or manifest.

Training and evaluation run in a worker thread (``asyncio.to_thread``) in a
task of their own, so messages keep flowing meanwhile; the result comes back
to the machine as an event through the driver. Work known to be tiny (fedbus's
own numpy trainer on a small partition, `fedbus.nodes.client_work`) runs on
the event loop instead, inside the driver when nothing (an attack, a
straggler delay) needs to wait.

Connections. Each connection carries a last will, an encoded Leave on the
node's ``leave`` channel, which the broker publishes if the connection dies
uncleanly; the server then stops waiting for the node. Simulated faults
(`fedbus.nodes.faults`) use that: a crash aborts the connection for good,
churn aborts it and reconnects (a new connection, a new will, a new Join)
some rounds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from fedbus import codec, topics
from fedbus._types import RunId
from fedbus.aggregation.scaffold import CONTROL, client_control_update, correction
from fedbus.learning.seeds import fit_seed
from fedbus.learning.trainer import EvalResult, FitConfig, FitResult, Trainer
from fedbus.messages import (
    Ack,
    Join,
    Leave,
    Manifest,
    ModelBroadcast,
    ModelUpdate,
    UpdateFailure,
    extra_tensors,
    extras_from_arrays,
    tensors_from_arrays,
)
from fedbus.nodes.client_work import WorkTimer
from fedbus.nodes.driver import Driver
from fedbus.nodes.faults import FaultPlan
from fedbus.nodes.server import LEAVE_CHANNEL, MANIFEST_CHANNEL, MODEL_CHANNEL
from fedbus.nodes.shared_views import is_selected, scalars, shared_arrays
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg import (
    CancelTraining,
    Evaluate,
    EvaluationDone,
    FedAvgClient,
    ManifestReceived,
    ModelReceived,
    SendFailure,
    SendUpdate,
    Stop,
    Train,
    TrainingDone,
    TrainingFailed,
)
from fedbus.transport.base import Transport, Will
from fedbus.transport.messenger import Incoming, Messenger

if TYPE_CHECKING:
    from fedbus.nodes.serving import TfliteServing

__all__ = ["ClientNode", "ClientOutcome", "ClientSettings", "Connect", "LocalAttack"]

log = logging.getLogger(__name__)

Connect = Callable[[Will], Transport]
"""Builds a fresh (not yet entered) connection for this node carrying ``will``."""

_NO_RUN = RunId("-")


class LocalAttack(Protocol):
    """Simulation only: replaces a client's honest training (`fedbus.launch.robustness`)."""

    async def fit(
        self, round_num: int, weights: Mapping[str, Any], config: FitConfig, selected: Sequence[str]
    ) -> FitResult | None:
        """The result to send for ``round_num`` instead of honest training; None: train honestly."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSettings:
    """Who the client is and how it finds its server.

    Attributes:
        node_id: this node's id (its MQTT client id).
        namespace: the topic run level (the topology name).
        server_id: the server's node id.
        seed: the run's seed; local training of round r uses ``fit_seed(seed, r, node_id)``.
        join_attempts: Joins sent per session before giving up on an answer.
        join_backoff_s: first wait for an answer to a Join; doubles per attempt (max 8 s).
        round_hint_s: assumed round length before one was seen (churn down time).
    """

    node_id: str
    namespace: str
    server_id: str
    seed: int = 0
    join_attempts: int = 8
    join_backoff_s: float = 0.5
    round_hint_s: float = 5.0


@dataclass(frozen=True, slots=True)
class ClientOutcome:
    """How a client node ended.

    ``finished``: the run ended; ``crashed``: a simulated crash; ``failed``:
    an error, described in ``reason``.
    """

    node_id: str
    status: Literal["finished", "crashed", "failed"]
    reason: str = ""


class ClientNode:
    """The FedAvg client runtime.

    Args:
        trainer: local training and evaluation.
        connect: builds this node's connection (called again after churn).
        settings: identity and discovery settings.
        faults: simulated faults; None injects none.
        attack: simulation only: forges this node's updates (an attacker); None is honest.
        tflite: serves each global model received through a TFLite interpreter
            (`fedbus.nodes.serving`; `predict`), and adds its local accuracy
            to the update metrics as ``tflite_accuracy``; None serves nothing.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        trainer: Trainer,
        connect: Connect,
        settings: ClientSettings,
        *,
        faults: FaultPlan | None = None,
        attack: LocalAttack | None = None,
        tflite: TfliteServing | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.trainer = trainer
        self.tflite = tflite
        self._served_round = -1  # the round of the model `tflite` serves
        self.settings = settings
        self.id = settings.node_id
        self._connect = connect
        self._faults = faults if faults is not None and faults.active else None
        self._attack = attack
        self._selected: Sequence[str] = ()  # the last model broadcast's selection (attacks)
        self._clock = clock
        data = getattr(trainer, "train", None)  # the built-in trainers expose their data
        self._num_examples = len(data) if data is not None else 0
        self.machine = FedAvgClient(run=_NO_RUN)
        self._exit: Literal["", "crash", "churn"] = ""
        self.away = False
        """True while churn keeps the node disconnected."""
        self._down_rounds = 0
        self._seen_round = 0
        self._round_s = settings.round_hint_s
        self._round_at: float | None = None
        self._joined_run: str = ""
        self._join_ids: set[str] = set()
        self._confirmed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._work: asyncio.Task[None] | None = None
        self._messenger: Messenger | None = None
        self._driver = Driver(self.machine, self._execute, clock=clock)
        self._work_timer = WorkTimer(trainer, self._num_examples)
        self._control: dict[str, Any] | None = None
        """SCAFFOLD's client control variate c_i: kept across rounds and churn, reset per run."""

    async def run(self) -> ClientOutcome:
        """Take part until the run finishes (or a simulated crash); never raises for errors.

        An error (lost connection, a bug) is logged with the node id; the
        connection is then aborted, so the server learns from the will.
        """
        try:
            while True:
                status = await self._connection()
                if status != "churn":
                    return ClientOutcome(self.id, status)
                self.away = True
                down_s = self._down_rounds * self._round_s
                log.info(
                    "%s: churn: away for %d round(s) (%.1f s)", self.id, self._down_rounds, down_s
                )
                await asyncio.sleep(down_s)
                self.away = False
        except Exception as exc:  # the node runtime boundary (STYLE.md section 6)
            log.exception("node %s failed", self.id)
            return ClientOutcome(self.id, "failed", f"{type(exc).__name__}: {exc}")

    def _will(self) -> Will:
        topic = topics.broadcast(self.settings.namespace, self.id, LEAVE_CHANNEL)
        # The run id is not known at connect time; the server accepts any run's Leave.
        leave = Leave(run=self.settings.namespace, sender=self.id, reason="connection lost")
        return Will(topic=topic, payload=codec.encode(leave))

    async def _connection(self) -> Literal["finished", "crashed", "churn"]:
        """One connection: until the run ends, a crash, or churn takes the node away."""
        self._exit, self._joined_run = "", ""
        transport = self._connect(self._will())
        driver = self._driver = Driver(self.machine, self._execute, clock=self._clock)
        async with transport:
            try:
                async with Messenger(
                    transport, node_id=self.id, run=self.settings.namespace, strict_run=False
                ) as messenger:
                    self._messenger = messenger
                    server = self.settings.server_id
                    await messenger.subscribe_broadcasts(server, MANIFEST_CHANNEL)
                    await messenger.subscribe_broadcasts(server, MODEL_CHANNEL)
                    async with asyncio.TaskGroup() as tg:
                        receiver = tg.create_task(
                            self._receive(driver, messenger), name=f"fedbus[{self.id}].receive"
                        )
                        await driver.run()
                        receiver.cancel()
            except BaseException:
                await _abort(transport)  # an error or Ctrl-C: let the will tell the server
                raise
            finally:
                await self._cancel_tasks()
            if self._exit:
                await _abort(transport)
                return "crashed" if self._exit == "crash" else "churn"
        return "finished"

    # -- messages -> events --------------------------------------------------------

    async def _receive(self, driver: Driver, messenger: Messenger) -> None:
        """Turn each message into an event for the driver, in the messenger's receive task.

        Messages reach `_on_incoming` synchronously (`Messenger.deliver_to`):
        no queue and no task of its own between the messenger and the driver,
        so a model broadcast costs a simulated client one task wake-up (the
        driver's) instead of two. This loop only waits for the end.
        """

        def sink(incoming: Incoming) -> None:
            self._on_incoming(incoming.message, driver, messenger)

        messenger.deliver_to(sink)
        try:
            async for incoming in messenger.messages():
                sink(incoming)  # only what was queued before the sink was set
        finally:
            messenger.deliver_to(None)

    def _on_incoming(self, msg: object, driver: Driver, messenger: Messenger) -> None:
        if self._exit:
            return  # a simulated fault took the node away: hear nothing more
        if isinstance(msg, Manifest):
            event: Event | None = self._on_manifest(msg, driver, messenger)
        elif isinstance(msg, ModelBroadcast):
            event = self._on_model(msg)
        elif isinstance(msg, Ack):
            if msg.ref in self._join_ids:
                self._confirmed.set()
            elif msg.status == "rejected":
                log.debug("%s: update %s rejected: %s", self.id, msg.ref, msg.detail)
            event = None
        else:
            event = None
        if self._exit:
            driver.stop()
        elif event is not None:
            driver.post(event)

    def _on_manifest(self, msg: Manifest, driver: Driver, messenger: Messenger) -> Event | None:
        if msg.run != self.machine.run:
            if msg.state == "finished":
                return None  # a run we never took part in ended: wait for the next
            log.info("%s: run %s (round %d, %s)", self.id, msg.run, msg.round, msg.state)
            # Abandon the old session's work. Not awaited: a cancelled task never
            # posts (CancelledError passes `_work_on`), and the new machine drops
            # results of work it did not ask for.
            self._cancel_tasks_now()
            self.machine = FedAvgClient(run=RunId(msg.run))
            driver.replace(self.machine)
            self._control = None
            self._seen_round = 0
        if self._joined_run != msg.run and msg.state != "finished":
            self._joined_run = msg.run
            self._start_joining(RunId(msg.run), messenger)
        if is_selected(self.id, msg.selected, explicit=True):
            self._confirmed.set()
        self._check_faults(msg.round)
        return ManifestReceived(run=RunId(msg.run), round=msg.round, state=msg.state)

    def _on_model(self, msg: ModelBroadcast) -> Event | None:
        if msg.run != self.machine.run:
            return None
        selected = is_selected(self.id, msg.selected)
        self._selected = msg.selected
        if is_selected(self.id, msg.selected, explicit=True):
            self._confirmed.set()
        self._check_faults(msg.round)
        weights = shared_arrays(msg.weights)
        if self.tflite is not None and msg.round != self._served_round:
            # On the loop: a patch, a fresh interpreter and one batched invoke, well
            # under a millisecond for the built-in models; never in a worker thread,
            # since an interpreter is not thread-safe (fedbus.nodes.serving).
            self.tflite.update(weights)
            self._served_round = msg.round
        return ModelReceived(
            run=RunId(msg.run), round=msg.round, weights=weights,
            selected=selected, config=msg.config, model_id=msg.id, extras=extra_tensors(msg),
        )  # fmt: skip

    def predict(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Logits of the newest global model for ``x``, through the TFLite interpreter.

        The smallest on-board inference entry point: an application running
        the node in its own event loop calls it between rounds.

        Raises:
            RuntimeError: the node serves no TFLite model (``tflite=None``,
                no model received yet, or serving stopped).
        """
        if self.tflite is None:
            raise RuntimeError(f"{self.id} serves no TFLite model (fedbus node --serve-tflite)")
        return self.tflite.predict(x)

    def _check_faults(self, round_num: int) -> None:
        if round_num <= self._seen_round:
            return
        now = self._clock()
        if self._round_at is not None and self._seen_round:
            self._round_s = max(0.05, (now - self._round_at) / (round_num - self._seen_round))
        self._seen_round, self._round_at = round_num, now
        faults = self._faults
        if faults is None:
            return
        if faults.crashes(round_num):
            log.info("%s: simulated crash at round %d", self.id, round_num)
            self._exit = "crash"
        elif down := faults.leaves(round_num):
            self._exit, self._down_rounds = "churn", down

    def _start_joining(self, run: RunId, messenger: Messenger) -> None:
        self._confirmed = asyncio.Event()
        self._spawn(self._join(run, messenger, self._confirmed), "join")

    async def _join(self, run: RunId, messenger: Messenger, confirmed: asyncio.Event) -> None:
        wait_s = self.settings.join_backoff_s
        for _ in range(self.settings.join_attempts):
            join = Join(run=run, sender=self.id, num_examples=self._num_examples)
            self._join_ids.add(join.id)
            await messenger.send(self.settings.server_id, join)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await confirmed.wait()
                    return
            wait_s = min(8.0, wait_s * 2)
        log.warning(
            "%s: no answer to %d joins of run %s", self.id, self.settings.join_attempts, run
        )

    # -- commands ----------------------------------------------------------------------

    async def _execute(self, command: Command) -> bool:
        run, server, messenger = self.machine.run, self.settings.server_id, self._messenger
        assert messenger is not None
        match command:
            case Train() | Evaluate():
                if self._faults is not None and self._faults.drops(command.round):
                    log.debug("%s: simulated dropout in round %d", self.id, command.round)
                    return False
                delay = self._faults.delay_s(command.round) if self._faults is not None else 0.0
                if self._inline(command, delay):
                    self._driver.post(self._work_now(command))
                else:
                    self._work = self._spawn(
                        self._work_on(command, self._driver.post, delay), "train"
                    )
            case CancelTraining():
                if self._work is not None:
                    self._work.cancel()
                    self._work = None
            case SendUpdate():
                update = ModelUpdate(
                    run=run, round=command.round, sender=self.id,
                    weights=tensors_from_arrays(command.weights), num_examples=command.num_examples,
                    encoding=command.encoding, reply_to=command.reply_to,
                    metrics=scalars(command.metrics), extras=extras_from_arrays(command.extras),
                )  # fmt: skip
                await messenger.send(server, update)
            case SendFailure():
                failure = UpdateFailure(
                    run=run, round=command.round, sender=self.id,
                    reason=command.reason[:256], reply_to=command.reply_to,
                )  # fmt: skip
                await messenger.send(server, failure)
            case Stop():
                log.info("%s: %s", self.id, command.reason)
                return True
        return False

    async def _work_on(
        self, command: Train | Evaluate, post: Callable[[Event], None], delay_s: float
    ) -> None:
        round_num = command.round
        try:
            if isinstance(command, Train):
                fit = self._fit_config(command)
                forged: FitResult | None = None
                if self._attack is not None:
                    forged = await self._attack.fit(round_num, command.weights, fit, self._selected)
                if forged is not None:
                    result = forged
                else:
                    result = await self._work_timer.run(
                        "fit", self.trainer.fit, command.weights, fit
                    )
                event = self._trained(command, fit, result, honest=forged is None)
            else:
                ev = await self._work_timer.run("evaluate", self.trainer.evaluate, command.weights)
                event = _evaluated(round_num, ev)
        except Exception as exc:  # the user's trainer failed: that is data for the server
            event = self._failed(round_num, exc)
        if delay_s:  # a simulated straggler
            await asyncio.sleep(delay_s)
        post(event)

    def _work_now(self, command: Train | Evaluate) -> Event:
        """`_work_on` for work `_inline` allows: on the loop, no coroutine, no await.

        Why: at 1,000 simulated clients each coroutine frame and await of a
        fit that never suspends is paid 1,000 times a round.
        """
        timer = self._work_timer
        try:
            if isinstance(command, Train):
                fit = self._fit_config(command)
                result = timer.run_now("fit", self.trainer.fit, command.weights, fit)
                return self._trained(command, fit, result, honest=True)
            return _evaluated(
                command.round, timer.run_now("evaluate", self.trainer.evaluate, command.weights)
            )
        except Exception as exc:  # the user's trainer failed: that is data for the server
            return self._failed(command.round, exc)

    def _failed(self, round_num: int, exc: Exception) -> Event:
        log.warning("%s: local work for round %d failed: %r", self.id, round_num, exc)
        return TrainingFailed(round=round_num, reason=f"{type(exc).__name__}: {exc}")

    def _fit_config(self, command: Train) -> FitConfig:
        cfg = command.config
        server_control = command.extras.get(CONTROL) if command.extras else None
        return FitConfig(
            epochs=int(cfg.get("epochs", 1)), batch_size=int(cfg.get("batch_size", 16)),
            lr=float(cfg.get("lr", 0.05)), mu=float(cfg.get("mu", 0.0)),
            seed=fit_seed(self.settings.seed, command.round, self.id),
            correction=(
                None if server_control is None else correction(server_control, self._control)
            ),
        )  # fmt: skip

    def _trained(self, command: Train, fit: FitConfig, result: FitResult, *, honest: bool) -> Event:
        """The TrainingDone event of ``result`` (``honest``: our own training, not a forgery)."""
        round_num = command.round
        extras = {}
        server_control = command.extras.get(CONTROL) if command.extras else None
        if server_control is not None and honest:
            extras = {CONTROL: self._scaffold(command.weights, server_control, result, fit)}
        metrics = scalars(result.metrics)
        served = self.tflite
        # Only for the model this round trained from (a newer one may have come).
        if served and served.accuracy is not None and self._served_round == round_num:
            metrics["tflite_accuracy"] = served.accuracy
        return TrainingDone(
            round=round_num, weights=dict(result.weights), num_examples=result.num_examples,
            metrics=metrics, encoding="delta" if result.is_delta else "dense", extras=extras,
        )  # fmt: skip

    def _scaffold(
        self,
        weights: Mapping[str, Any],
        server_control: Mapping[str, Any],
        result: FitResult,
        fit: FitConfig,
    ) -> dict[str, Any]:
        """Update c_i after a SCAFFOLD round (option II) and return dc_i for the update.

        K, the local step count, is the trainer's ``local_steps`` metric when it
        reports one, else epochs x ceil(examples / batch size) (what the
        built-in trainers take).
        """
        steps = result.metrics.get("local_steps")
        if steps is None:
            steps = fit.epochs * math.ceil(result.num_examples / fit.batch_size)
        local = result.weights
        if result.is_delta:
            local = {n: np.asarray(weights[n]) + np.asarray(d) for n, d in local.items()}
        self._control, delta = client_control_update(
            global_weights=weights, local_weights=local, server_control=server_control,
            client_control=self._control, steps=int(steps), lr=fit.lr,
        )  # fmt: skip
        return delta

    def _inline(self, command: Train | Evaluate, delay_s: float) -> bool:
        """Whether ``command``'s work runs to its end inside the driver, without a task.

        Only work that `WorkTimer.run` runs on the loop anyway (tiny
        `NumpyTrainer` work), with no simulated attack or straggler delay (both
        await): the driver then handles the result next, with no task to create
        and wake. Nothing can overtake it (the driver takes no event
        meanwhile), so there is nothing to cancel.
        """
        if self._attack is not None or delay_s:
            return False
        return self._work_timer.tiny("fit" if isinstance(command, Train) else "evaluate")

    def _spawn(self, coro: Any, what: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"fedbus[{self.id}].{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _cancel_tasks_now(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._work = None

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._work = None


def _evaluated(round_num: int, ev: EvalResult) -> Event:
    metrics = {"accuracy": ev.accuracy, "loss": ev.loss, **ev.metrics}
    return EvaluationDone(round=round_num, num_examples=ev.num_examples, metrics=scalars(metrics))


async def _abort(transport: Transport) -> None:
    abort = getattr(transport, "abort", None)
    if abort is not None:
        await abort()
    else:
        await transport.aclose()

"""`ServerNode`: runs a `FedAvgServer` (or `FedBuffServer`) machine over a transport, writes results.

Tasks (one TaskGroup, STYLE.md section 4): ``fedbus[<id>].receive`` turns
messages into machine events (Join, Leave or last will, ModelUpdate,
UpdateFailure); ``fedbus[<id>].results`` evaluates each closed round's model
(in a worker thread, so the bus keeps flowing), writes its metrics row and
checkpoint; the node's own task drives the machine (`fedbus.nodes.driver`).

Topics: the messenger's run level is the federation's *namespace* (the
topology name, known in advance to agents and broker ACLs); the envelope
``run`` is this run's id. The messenger therefore does not filter runs
(``strict_run=False``): the machine rejects updates of other runs and counts
them as ``foreign_run``. The server publishes a retained Manifest on its
``manifest`` channel so nodes learn the run id and where it stands, and
clears it when the run ends; it is published on each change of state, not
on each attempt of consecutive rounds (the model broadcast already tells
connected clients that; see `ServerNode._execute`). Joins are acknowledged (Ack ``ok``) so clients
stop re-sending them; rejected updates get an Ack ``rejected`` with the reason.

Asynchronous runs (``mode: async``) drive a `FedBuffServer` with the same
node: messages, byte accounting, results and summary are the same; each
`BufferAggregated` becomes a metrics row (``round`` is the new model version,
``participants`` the buffered updates aggregated: K, or fewer after validator
rejections or at the aggregation deadline, ``deadline_flush``;
``staleness_mean``/``staleness_max`` how many versions old they were) and a
checkpoint (``--resume`` continues from its version). That machine issues no
manifests, so the node publishes them itself: ``running`` before the first
broadcast (clients learn the run id from it and join) and ``finished`` at the
end (clients stop). On the wire, version v travels as round v + 1
(``_offset``): clients take round 0 for "before the run" and would never train
on the initial model. Clients report no failures to it (the machine has no use
for them: it waits for K updates, up to its aggregation deadline,
`fedbus.protocols.fedbuff`).

Byte accounting: a round's ``bytes_up``/``bytes_down`` are the payload bytes
this node's connection received/sent between the close of the previous round
and the close of this one (so the round's model broadcast is in it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedbus._types import NodeId, RunId
from fedbus.errors import TransportError
from fedbus.learning.trainer import Trainer
from fedbus.messages import (
    Ack,
    Join,
    Leave,
    Manifest,
    ModelBroadcast,
    ModelUpdate,
    UpdateFailure,
    compact_selection,
    extra_tensors,
    extras_from_arrays,
    tensors_from_arrays,
    tensors_to_arrays,
)
from fedbus.nodes.driver import Driver
from fedbus.nodes.modelfile import Checkpoint
from fedbus.nodes.results import ResultsWriter
from fedbus.protocols.base import Command
from fedbus.protocols.fedavg import (
    BroadcastModel,
    EvaluationClosed,
    FedAvgServer,
    Finish,
    NodeJoined,
    NodeLeft,
    PublishManifest,
    Reject,
    RoundClosed,
    RoundFailed,
    Started,
    UpdateFailed,
    UpdateReceived,
)
from fedbus.protocols.fedbuff import BufferAggregated, FedBuffServer
from fedbus.transport.base import Transport
from fedbus.transport.messenger import Incoming, Messenger

__all__ = [
    "LEAVE_CHANNEL",
    "MANIFEST_CHANNEL",
    "MODEL_CHANNEL",
    "ServerNode",
    "ServerObserver",
    "ServerOutcome",
    "ServerSettings",
    "byte_counts",
]

log = logging.getLogger(__name__)

MODEL_CHANNEL = "model"
MANIFEST_CHANNEL = "manifest"
LEAVE_CHANNEL = "leave"


def byte_counts(transport: Transport) -> tuple[int, int]:
    """Payload bytes (received, sent) on ``transport``'s connection so far (0s if unknown)."""
    stats = getattr(transport, "stats", None)
    return int(getattr(stats, "bytes_in", 0)), int(getattr(stats, "bytes_out", 0))


class ServerObserver:
    """Progress callbacks (the ``fedbus run`` display); every method is optional."""

    def on_joined(self, joined: int, expected: int | None) -> None:
        """A node joined (or joined again) before or during the run."""

    def on_round(self, row: Mapping[str, Any]) -> None:
        """A round's metrics row was written."""

    def on_round_failed(self, failed: RoundFailed) -> None:
        """A round attempt missed its quorum (it is retried, or the run ends)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """Who the server is and what its results say.

    Attributes:
        node_id: the server's node id.
        namespace: the topic run level (the topology name).
        name: the run name for the summary (the topology name).
        seed: the run's seed (summary, checkpoint).
        broker: ``{"kind": ..., "url": ...}`` for the summary.
        topology_text: the topology file, kept with the results and checkpoints.
        resume: the checkpoint this run continues, if any.
        expected_nodes: how many clients the topology declares (progress display).
        summary_extra: more summary.json keys (the run's attacks and validators).
    """

    node_id: str
    namespace: str
    name: str
    seed: int = 0
    broker: Mapping[str, str] = field(default_factory=dict)
    topology_text: str = ""
    resume: Checkpoint | None = None
    expected_nodes: int | None = None
    summary_extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServerOutcome:
    """How the run ended; ``summary`` is what summary.json holds (None without results)."""

    success: bool
    reason: str
    completed_round: int
    summary: dict[str, Any] | None = None


@dataclass(slots=True)
class _Closed:
    row: dict[str, Any]
    cmd: RoundClosed
    elapsed_s: float
    bytes_total: int


class ServerNode:
    """The central server runtime: FedAvg rounds, or FedBuff's asynchronous aggregations.

    Args:
        machine: the server machine (fresh, or `FedAvgServer.from_checkpoint`), or
            a `FedBuffServer` (``mode: async``; module docstring).
        transport: this node's own connection (not yet entered).
        settings: identity and summary fields.
        evaluator: scores the global model on the test split (central evaluation).
        results: where results go; None writes none.
        observer: progress callbacks.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        machine: FedAvgServer | FedBuffServer,
        transport: Transport,
        settings: ServerSettings,
        *,
        evaluator: Trainer | None = None,
        results: ResultsWriter | None = None,
        observer: ServerObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.machine = machine
        self.transport = transport
        self.settings = settings
        self.id = settings.node_id
        self.run_id: RunId = machine.run
        self._evaluator = evaluator
        self._results = results
        self._observer = observer or ServerObserver()
        self._clock = clock
        self._federated = (
            isinstance(machine, FedAvgServer) and machine.config.evaluate == "federated"
        )
        self._rounds = (
            machine.config.rounds
            if isinstance(machine, FedAvgServer)
            else machine.config.max_versions
        )
        self._offset = 1 if isinstance(machine, FedBuffServer) else 0  # wire round - version
        resume = settings.resume
        self._elapsed_base = resume.elapsed_s if resume else 0.0
        self._bytes_base = resume.bytes_total if resume else 0
        self._pending: dict[str, Any] | None = (
            json.loads(resume.pending_row) if resume and resume.pending_row else None
        )
        self._queue: asyncio.Queue[_Closed | EvaluationClosed | None] = asyncio.Queue()
        self._acks: set[asyncio.Task[None]] = set()
        self._messenger: Messenger | None = None
        self._started = 0.0
        self._round_started: float | None = None
        self._bytes_mark = (0, 0)
        self._mismatch_mark = 0
        self._model_id = ""
        self._joined: set[str] = set()
        self._finish: Finish | None = None
        self._manifest_state = ""  # the state the last published manifest named

    # -- running -------------------------------------------------------------------

    async def run(self) -> ServerOutcome:
        """Run until the machine finishes; never raises for a failure of the run itself.

        A crash of this node (transport lost, a bug) is logged with the node
        id and reported as an unsuccessful outcome.
        """
        try:
            return await self._run()
        except Exception as exc:  # the node runtime boundary (STYLE.md section 6)
            log.exception("node %s failed", self.id)
            return ServerOutcome(
                False, f"server {self.id} failed: {exc}", self.machine.completed_round
            )

    async def _run(self) -> ServerOutcome:
        async with (
            self.transport,
            Messenger(
                self.transport, node_id=self.id, run=self.settings.namespace, strict_run=False
            ) as messenger,
        ):
            self._messenger = messenger
            await messenger.subscribe_broadcasts(None, LEAVE_CHANNEL)
            self._started = self._clock()
            self._bytes_mark = byte_counts(self.transport)
            driver = Driver(self.machine, self._execute, clock=self._clock)
            async with asyncio.TaskGroup() as tg:
                receiver = tg.create_task(self._receive(driver), name=f"fedbus[{self.id}].receive")
                worker = tg.create_task(self._results_worker(), name=f"fedbus[{self.id}].results")
                if isinstance(self.machine, FedBuffServer):
                    done = self.machine.completed_round  # > 0 when resumed
                    await self._publish_manifest("running", done, 0)
                await driver.feed(Started())
                await driver.run()
                self._queue.put_nowait(None)
                await worker
                receiver.cancel()
                for ack in self._acks:
                    ack.cancel()
            summary = self._write_summary()
            with contextlib.suppress(Exception):  # best effort: the run is over either way
                async with asyncio.timeout(5.0):
                    await messenger.clear_retained(MANIFEST_CHANNEL)
        finish = self._finish
        assert finish is not None
        return ServerOutcome(finish.success, finish.reason, finish.completed_round, summary)

    # -- messages -> events ----------------------------------------------------------

    async def _receive(self, driver: Driver) -> None:
        """Turn messages into events as the messenger validates them (`Messenger.deliver_to`).

        Synchronous, in the messenger's receive path: no queue and no task hop
        per update (1,000 a round at 1,000 clients). This loop only takes what
        was queued before the sink was set, then waits for the end.
        """
        messenger = self._messenger
        assert messenger is not None

        def sink(incoming: Incoming) -> None:
            event = self._translate(incoming, messenger)
            if event is not None:
                driver.post(event)

        messenger.deliver_to(sink)
        try:
            async for incoming in messenger.messages():
                sink(incoming)
        finally:
            messenger.deliver_to(None)

    def _acknowledge(self, messenger: Messenger, recipient: NodeId, ack: Ack) -> None:
        """Send ``ack`` in a task of its own: `_translate` runs where it cannot wait."""

        async def send() -> None:
            try:
                await messenger.send(recipient, ack)
            except TransportError as exc:  # the node repeats its Join; the run goes on
                log.debug("%s: ack to %s failed: %s", self.id, recipient, exc)

        task = asyncio.create_task(send(), name=f"fedbus[{self.id}].ack")
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    def _translate(
        self, incoming: Incoming, messenger: Messenger
    ) -> NodeJoined | NodeLeft | UpdateReceived | UpdateFailed | None:
        topic, msg = incoming
        sender = NodeId(msg.sender)
        if isinstance(msg, Leave):
            # A last will is fixed at connect time, before the node knew the run
            # id, so a Leave counts whatever its run: the node is gone either way.
            return NodeLeft(node=sender, reason=msg.reason or "left")
        if topic.form != "to":
            return None  # broadcasts other than leave: not for the server
        if isinstance(msg, Join):
            if msg.run != self.run_id:
                log.debug("%s: join from %s names run %s, not ours", self.id, sender, msg.run)
                return None
            ack = Ack(run=self.run_id, round=0, sender=self.id, ref=msg.id)
            self._acknowledge(messenger, sender, ack)
            if sender not in self._joined:
                self._joined.add(sender)
                self._observer.on_joined(len(self._joined), self.settings.expected_nodes)
            return NodeJoined(node=sender, num_examples=msg.num_examples)
        if isinstance(msg, ModelUpdate):
            return UpdateReceived(
                sender=sender, run=RunId(msg.run), round=msg.round - self._offset,
                weights=tensors_to_arrays(msg.weights), num_examples=msg.num_examples,
                encoding=msg.encoding, metrics=msg.metrics, update_id=msg.id,
                reply_to=msg.reply_to, extras=extra_tensors(msg),
            )  # fmt: skip
        if isinstance(msg, UpdateFailure) and not self._offset:
            return UpdateFailed(
                sender=sender, run=RunId(msg.run), round=msg.round, reason=msg.reason,
                update_id=msg.id,
            )  # fmt: skip
        return None

    # -- commands ----------------------------------------------------------------------

    async def _execute(self, command: Command) -> bool:
        messenger = self._messenger
        assert messenger is not None
        match command:
            case BroadcastModel():
                # FedBuff's catch-up broadcasts to a joining node are attempts 1 of the
                # current version too: its aggregation period started at the last close.
                fresh = command.attempt == 1 and isinstance(self.machine, FedAvgServer)
                if fresh or self._round_started is None:
                    self._round_started = self._clock()
                self._model_id = command.request_id
                message = ModelBroadcast(
                    run=self.run_id, round=command.round + self._offset, sender=self.id,
                    id=command.request_id, weights=tensors_from_arrays(command.weights),
                    config=dict(command.config),
                    selected=compact_selection(command.selected, self.machine.live_nodes),
                    extras=extras_from_arrays(command.extras),
                )  # fmt: skip
                await messenger.broadcast(message, MODEL_CHANNEL)
            case PublishManifest():
                if command.state == "collecting" == self._manifest_state:
                    # Issue 3: a manifest for every attempt reached every client (at
                    # 1,000 clients, 1,000 deliveries and PUBACKs a round, a quarter
                    # of the round's packets) while telling connected clients nothing
                    # the attempt's model broadcast does not (run, round, selection).
                    # Only state changes are published: the run id for late joiners,
                    # WAITING_FOR_NODES, EVALUATING and FINISHED. The retained copy
                    # may therefore name an earlier round of this run; a late joiner
                    # only needs its run id and that the run is not finished, and
                    # takes part from the next model broadcast.
                    return False
                self._manifest_state = command.state
                manifest = Manifest(
                    run=command.run, round=command.round, sender=self.id, state=command.state,
                    attempt=command.attempt, completed_round=command.completed_round,
                    rounds=self._rounds,
                    model_id=self._model_id if command.state in ("collecting", "evaluating") else "",
                    selected=compact_selection(command.selected, self.machine.live_nodes),
                )  # fmt: skip
                await messenger.broadcast(manifest, MANIFEST_CHANNEL, retain=True)
            case Reject():
                log.debug("%s: rejected %s (round %d): %s %s", self.id, command.sender,
                          command.round, command.reason, command.detail)  # fmt: skip
                if command.update_id:
                    ack = Ack(
                        run=self.run_id, round=command.round + self._offset, sender=self.id,
                        ref=command.update_id, status="rejected", detail=command.reason,
                    )  # fmt: skip
                    await messenger.send(command.sender, ack)
            case RoundClosed():
                self._queue.put_nowait(self._close_round(command, messenger))
            case RoundFailed():
                log.info("%s: round %d attempt %d failed: %s", self.id, command.round,
                         command.attempt, command.reason)  # fmt: skip
                self._observer.on_round_failed(command)
            case EvaluationClosed():
                self._queue.put_nowait(command)
            case BufferAggregated():
                self._queue.put_nowait(self._close_buffer(command, messenger))
            case Finish():
                if isinstance(self.machine, FedBuffServer):
                    await self._publish_manifest("finished", command.completed_round, 0)
                self._finish = command
                return True
        return False

    async def _publish_manifest(self, state: str, completed: int, attempt: int) -> None:
        """The retained manifest of an asynchronous run (the FedBuff machine issues none)."""
        assert self._messenger is not None
        self._manifest_state = state
        manifest = Manifest(
            run=self.run_id, round=completed + self._offset, sender=self.id, state=state,
            attempt=attempt,
            completed_round=completed, rounds=self._rounds, model_id="", selected=[],
        )  # fmt: skip
        await self._messenger.broadcast(manifest, MANIFEST_CHANNEL, retain=True)

    def _close_buffer(self, cmd: BufferAggregated, messenger: Messenger) -> _Closed:
        """A FedBuff aggregation as a round row, plus its staleness statistics.

        It goes through `_close_round` (as a one-attempt round whose participants
        are the K buffered senders) so wall time, bytes, ``rejected`` and the
        checkpoint are accounted exactly as for FedAvg.
        """
        train = {k: v for k, v in cmd.metrics.items() if k == "train_loss"}
        closed = RoundClosed(
            round=cmd.version, attempt=1, weights=cmd.weights,
            participants=tuple(sender for sender, _, _ in cmd.contributors), dropped=(),
            rejected=dict(cmd.rejected), num_examples=cmd.num_examples, client_metrics=train,
            federated_metrics={}, aggregator_state={},
        )  # fmt: skip
        item = self._close_round(closed, messenger)
        stale = [s for _, _, s in cmd.contributors]
        item.row["staleness_mean"] = round(sum(stale) / len(stale), 6) if stale else 0.0
        item.row["staleness_max"] = max(stale, default=0)
        item.row["deadline_flush"] = cmd.deadline  # a partial buffer flushed at the deadline
        return item

    def _close_round(self, cmd: RoundClosed, messenger: Messenger) -> _Closed:
        now = self._clock()
        bytes_in, bytes_out = byte_counts(self.transport)
        up, down = bytes_in - self._bytes_mark[0], bytes_out - self._bytes_mark[1]
        self._bytes_mark = (bytes_in, bytes_out)
        rejected = Counter(cmd.rejected)
        # Forged senders never reach the machine: the messenger drops them first.
        mismatched = messenger.stats.dropped["sender_mismatch"]
        if mismatched > self._mismatch_mark:
            rejected["sender_mismatch"] += mismatched - self._mismatch_mark
            self._mismatch_mark = mismatched
        started = self._round_started if self._round_started is not None else now
        self._round_started = None
        elapsed = self._elapsed_base + (now - self._started)
        row: dict[str, Any] = {
            "round": cmd.round,
            "wall_s": round(now - started, 6),
            "elapsed_s": round(elapsed, 6),
            "accuracy": None,
            "loss": None,
            "participants": len(cmd.participants),
            "dropped": len(cmd.dropped),
            "rejected": dict(sorted(rejected.items())),
            "bytes_up": up,
            "bytes_down": down,
            "attempt": cmd.attempt,
            "num_examples": cmd.num_examples,
        }
        if "train_loss" in cmd.client_metrics:
            row["train_loss"] = cmd.client_metrics["train_loss"]
        if "tflite_accuracy" in cmd.client_metrics:  # clients serving TFLite (fedbus.nodes.serving)
            row["tflite_accuracy"] = cmd.client_metrics["tflite_accuracy"]
        total = self._bytes_base + sum(byte_counts(self.transport))
        return _Closed(row, cmd, elapsed, total)

    # -- results -------------------------------------------------------------------------

    async def _results_worker(self) -> None:
        while (item := await self._queue.get()) is not None:
            if isinstance(item, EvaluationClosed):
                self._complete_pending(item.federated_metrics)
                continue
            row, cmd = item.row, item.cmd
            if self._federated:
                # Clients evaluate the model they receive: this round's reports
                # describe the previous round's model.
                self._complete_pending(cmd.federated_metrics)
                self._pending = row
            elif self._evaluator is not None:
                result = await asyncio.to_thread(self._evaluator.evaluate, cmd.weights)
                row["accuracy"], row["loss"] = float(result.accuracy), float(result.loss)
                # The evaluator's extra metrics, e.g. backdoor_accuracy under a backdoor attack.
                row.update({k: float(v) for k, v in result.metrics.items()})
            if not self._federated:
                self._emit(row)
            if self._results is not None:
                self._results.checkpoint(
                    Checkpoint(
                        name=self.settings.name, run=self.run_id, round=cmd.round,
                        seed=self.settings.seed, elapsed_s=item.elapsed_s,
                        bytes_total=item.bytes_total, weights=cmd.weights,
                        aggregator_state=cmd.aggregator_state,
                        pending_row=json.dumps(self._pending) if self._pending else "",
                        topology=self.settings.topology_text,
                    )
                )  # fmt: skip
                if self._results.tflite is not None:
                    await asyncio.to_thread(self._results.export_tflite, cmd.weights)
        self._complete_pending({})

    def _complete_pending(self, metrics: Mapping[str, float]) -> None:
        row, self._pending = self._pending, None
        if row is None:
            return
        if metrics:
            row["accuracy"], row["loss"] = metrics.get("accuracy"), metrics.get("loss")
            row["eval_num_examples"] = metrics.get("num_examples")
        self._emit(row)

    def _emit(self, row: dict[str, Any]) -> None:
        if self._results is not None:
            self._results.append(row)
        self._observer.on_round(row)

    def _write_summary(self) -> dict[str, Any] | None:
        finish = self._finish
        if self._results is None or finish is None:
            return None
        wall_s = self._elapsed_base + (self._clock() - self._started)
        summary = {
            **self.settings.summary_extra,
            "name": self.settings.name,
            "protocol": "centralized",
            "wall_s": round(wall_s, 6),
            "bytes_total": self._bytes_base + sum(byte_counts(self.transport)),
            "broker": dict(self.settings.broker),
            "run": self.run_id,
            "seed": self.settings.seed,
            "success": finish.success,
            "reason": finish.reason,
        }
        return self._results.finish(
            self.machine.weights, summary, title=f"{self.settings.name} ({self.run_id})"
        )

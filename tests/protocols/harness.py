"""A Federation of one FedAvgServer and N FedAvgClients, wired like h11's ConnectionPair.

Commands are delivered as events at once: a BroadcastModel reaches every
joined client as ModelReceived, a client's SendUpdate reaches the server as
UpdateReceived, the retained manifest is kept for late joiners. Training is
the one thing left pending, so tests decide when (and whether) each client's
trainer finishes: `finish_tasks`. A client's "trained" weights are the global
weights plus its 1-based index, which makes the weighted mean easy to check.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedbus._types import NodeId, RunId
from fedbus.aggregation import Aggregator, Validator
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg import (
    BroadcastModel,
    CancelTraining,
    Evaluate,
    EvaluationDone,
    FedAvgClient,
    FedAvgConfig,
    FedAvgServer,
    ManifestReceived,
    ModelReceived,
    NodeJoined,
    NodeLeft,
    PublishManifest,
    SendFailure,
    SendUpdate,
    Started,
    Tick,
    Train,
    TrainingDone,
    TrainingFailed,
    UpdateFailed,
    UpdateReceived,
)

RUN = RunId("run-1")


def initial_weights() -> dict[str, np.ndarray[Any, Any]]:
    return {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


class Federation:
    """One server, N clients, instant delivery, trainers completed on demand."""

    def __init__(
        self,
        clients: Sequence[str],
        *,
        config: FedAvgConfig | None = None,
        expected_nodes: int | str | None = "all",
        examples: Mapping[str, int] | None = None,
        aggregator: Aggregator | None = None,
        validators: Sequence[Validator] = (),
        server: FedAvgServer | None = None,
    ) -> None:
        self.config = config or FedAvgConfig(rounds=3, min_clients=1)
        self.server = server or FedAvgServer(
            self.config, run=RUN, weights=initial_weights(), aggregator=aggregator,
            validators=validators,
            expected_nodes=len(clients) if expected_nodes == "all" else expected_nodes,  # type: ignore[arg-type]
        )  # fmt: skip
        self.names = list(clients)
        self.examples = {c: (examples or {}).get(c, 10 * (i + 1)) for i, c in enumerate(clients)}
        self.clients: dict[str, FedAvgClient] = {}
        self.sent: list[Command] = []  # every server command, in order
        self.client_sent: dict[str, list[Command]] = {c: [] for c in clients}
        self.tasks: dict[str, Train | Evaluate] = {}
        self.cancelled: list[tuple[str, int]] = []
        self.manifest: PublishManifest | None = None
        self.eval_accuracy = {c: 0.5 + 0.1 * i for i, c in enumerate(clients)}

    # --- driving -----------------------------------------------------------------

    def to_server(self, event: Event, now: float) -> list[Command]:
        commands = self.server.handle(event, now=now)
        self.sent += commands
        for command in commands:
            self._deliver_down(command, now)
        return commands

    def start(self, now: float = 0.0, *, join: Iterable[str] | None = None) -> None:
        self.to_server(Started(), now)
        for name in self.names if join is None else join:
            self.join(name, now)

    def join(self, name: str, now: float) -> None:
        client = self.clients.setdefault(name, FedAvgClient(run=RUN))
        if self.manifest is not None:  # the retained manifest reaches a new subscriber
            m = self.manifest
            self._to_client(name, ManifestReceived(run=m.run, round=m.round, state=m.state), now)
        del client
        self.to_server(NodeJoined(node=NodeId(name), num_examples=self.examples[name]), now)

    def leave(self, name: str, now: float) -> None:
        self.clients.pop(name, None)
        self.tasks.pop(name, None)
        self.to_server(NodeLeft(node=NodeId(name)), now)

    def tick(self, now: float) -> list[Command]:
        return self.to_server(Tick(), now)

    def finish_tasks(
        self, now: float, *, only: Iterable[str] | None = None, fail: Iterable[str] = ()
    ) -> None:
        """Let the named (default: all) pending trainers finish; ``fail`` ones raise."""
        failing = set(fail)
        for name in sorted(self.tasks if only is None else only):
            task = self.tasks.pop(name, None)
            if task is None:
                continue
            event: Event
            if name in failing:
                event = TrainingFailed(round=task.round, reason="trainer raised")
            elif isinstance(task, Train):
                bump = np.float32(self.names.index(name) + 1)
                event = TrainingDone(
                    round=task.round,
                    weights={k: (np.asarray(v) + bump).astype(np.float32) for k, v in task.weights.items()},
                    num_examples=self.examples[name],
                    metrics={"loss": float(bump)},
                )  # fmt: skip
            else:
                event = EvaluationDone(
                    round=task.round, num_examples=self.examples[name],
                    metrics={"accuracy": self.eval_accuracy[name], "loss": 1.0},
                )  # fmt: skip
            self._to_client(name, event, now)

    def run_rounds(self, count: int, *, start: float = 0.0, step: float = 1.0) -> float:
        now = start
        for _ in range(count):
            now += step
            self.finish_tasks(now)
        return now

    # --- delivery --------------------------------------------------------------

    def _deliver_down(self, command: Command, now: float) -> None:
        if isinstance(command, PublishManifest):
            self.manifest = command
            for name in list(self.clients):
                m = ManifestReceived(run=command.run, round=command.round, state=command.state)
                self._to_client(name, m, now)
        elif isinstance(command, BroadcastModel):
            for name in list(self.clients):
                event = ModelReceived(
                    run=RUN, round=command.round, weights=command.weights,
                    selected=name in command.selected, config=command.config,
                    model_id=command.request_id,
                )  # fmt: skip
                self._to_client(name, event, now)

    def _to_client(self, name: str, event: Event, now: float) -> None:
        client = self.clients.get(name)
        if client is None:
            return
        commands = client.handle(event, now=now)
        self.client_sent[name] += commands
        for command in commands:
            if isinstance(command, Train | Evaluate):
                self.tasks[name] = command
            elif isinstance(command, CancelTraining):
                self.cancelled.append((name, command.round))
                self.tasks.pop(name, None)
            elif isinstance(command, SendUpdate):
                self.to_server(
                    UpdateReceived(
                        sender=NodeId(name), run=RUN, round=command.round,
                        weights=command.weights, num_examples=command.num_examples,
                        encoding=command.encoding, metrics=command.metrics,
                        update_id=f"{name}:{command.round}", reply_to=command.reply_to,
                    ),
                    now,
                )  # fmt: skip
            elif isinstance(command, SendFailure):
                self.to_server(
                    UpdateFailed(sender=NodeId(name), run=RUN, round=command.round,
                                 reason=command.reason),
                    now,
                )  # fmt: skip

    # --- reading the transcript -------------------------------------------------

    def of(self, kind: type[Any]) -> list[Any]:
        return [c for c in self.sent if isinstance(c, kind)]

"""A hierarchy of one cloud FedAvgServer, EdgeAggregators and HierarchicalClients.

Like `harness.Federation`, commands are delivered as events at once (through a
FIFO queue, so no machine is re-entered): a BroadcastModel reaches every node
currently attached to its sender, a SendUpdate reaches the sender's current
parent, a SwitchParent moves the node (Leave to the old parent if alive, Join
at the new one, its retained manifest replayed). Device training stays
pending until `finish_tasks`; a device's trained weights are the model plus
its 1-based index. `kill` makes a node vanish: its parent sees NodeLeft and,
unless ``will=False``, its children see ParentLost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedbus._types import NodeId, RunId
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg import (
    BroadcastModel,
    CancelTraining,
    Evaluate,
    EvaluationDone,
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
    UpdateFailed,
    UpdateReceived,
)
from fedbus.protocols.hierarchical import EdgeAggregator
from fedbus.protocols.hierarchical_client import HierarchicalClient
from fedbus.protocols.hierarchical_rehoming import (
    ParentLost,
    RehomeConfig,
    Rehoming,
    SwitchParent,
    fallback_chain,
)

RUN = RunId("run-h")
CLOUD = NodeId("cloud")


def initial_weights() -> dict[str, np.ndarray[Any, Any]]:
    return {"w": np.zeros(4, np.float64)}


Machine = FedAvgServer | EdgeAggregator | HierarchicalClient


class Hierarchy:
    """cloud -> edges -> devices, with instant delivery and on-demand training."""

    def __init__(
        self,
        edges: Mapping[str, Sequence[str]],
        *,
        rounds: int = 3,
        edge_rounds: int = 2,
        cloud: FedAvgConfig | None = None,
        edge_configs: Mapping[str, FedAvgConfig] | None = None,
        rehome: str = "parent",
        parent_timeout_s: float | None = None,
        examples: Mapping[str, int] | None = None,
    ) -> None:
        self.cloud_config = cloud or FedAvgConfig(
            rounds=rounds, min_clients=1, round_timeout_s=100.0, join_timeout_s=50.0
        )
        self.parent: dict[str, str] = {}
        self.machines: dict[str, Machine] = {
            CLOUD: FedAvgServer(self.cloud_config, run=RUN, weights=initial_weights(),
                                expected_nodes=len(edges)),
        }  # fmt: skip
        self.examples: dict[str, int] = {}
        self.devices: list[str] = []
        order = list(edges)
        for edge, devices in edges.items():
            config = (edge_configs or {}).get(edge) or FedAvgConfig(
                min_clients=1, round_timeout_s=10.0, join_timeout_s=5.0
            )
            self.machines[edge] = EdgeAggregator(
                config, node=NodeId(edge), run=RUN, edge_rounds=edge_rounds
            )
            self.parent[edge] = CLOUD
            for device in devices:
                chain = fallback_chain(
                    rehome,  # type: ignore[arg-type]
                    parent=NodeId(edge), grandparent=CLOUD, siblings=[NodeId(e) for e in order],
                )  # fmt: skip
                policy = Rehoming(
                    RehomeConfig(fallbacks=chain, parent_timeout_s=parent_timeout_s),
                    parent=NodeId(edge),
                )
                self.machines[device] = HierarchicalClient(run=RUN, rehoming=policy)
                self.parent[device] = edge
                self.devices.append(device)
                self.examples[device] = (examples or {}).get(device, 10 * len(self.devices))
        self.alive: set[str] = set(self.machines)
        self.sent: dict[str, list[Command]] = {n: [] for n in self.machines}
        self.manifest: dict[str, PublishManifest] = {}
        self.tasks: dict[str, Train | Evaluate] = {}
        self.queue: deque[tuple[str, Event]] = deque()

    # --- driving -----------------------------------------------------------------

    def start(self, now: float = 0.0) -> None:
        for node in self.machines:
            self.post(node, Started())
        self.flush(now)
        for node, parent in self.parent.items():
            examples = self.examples.get(node, 0)
            self.post(parent, NodeJoined(node=NodeId(node), num_examples=examples))
        self.flush(now)

    def post(self, node: str, event: Event) -> None:
        self.queue.append((node, event))

    def flush(self, now: float) -> None:
        while self.queue:
            node, event = self.queue.popleft()
            if node not in self.alive:
                continue
            commands = self.machines[node].handle(event, now=now)
            self.sent[node] += commands
            for command in commands:
                self._route(node, command)

    def tick(self, now: float) -> None:
        for node in sorted(self.alive):
            self.post(node, Tick())
        self.flush(now)

    def finish_tasks(self, now: float, *, only: Iterable[str] | None = None) -> None:
        for name in sorted(self.tasks if only is None else only):
            task = self.tasks.pop(name, None)
            if task is None or name not in self.alive:
                continue
            if isinstance(task, Train):
                bump = float(self.devices.index(name) + 1)
                event: Event = TrainingDone(
                    round=task.round, weights={k: np.asarray(v) + bump for k, v in task.weights.items()},
                    num_examples=self.examples[name], metrics={"loss": bump},
                )  # fmt: skip
            else:
                event = EvaluationDone(round=task.round, num_examples=self.examples[name])
            self.post(name, event)
        self.flush(now)

    def kill(self, node: str, now: float, *, will: bool = True) -> None:
        self.alive.discard(node)
        self.tasks.pop(node, None)
        self.post(self.parent[node], NodeLeft(node=NodeId(node), reason="killed"))
        if will:
            for child, parent in sorted(self.parent.items()):
                if parent == node:
                    self.post(child, ParentLost(parent=NodeId(node), reason="last will"))
        self.flush(now)

    def run(self, *, start: float = 1.0, step: float = 1.0, max_steps: int = 200) -> float:
        """Finish every pending task, step after step, until the cloud is done."""
        now = start
        for _ in range(max_steps):
            if self.machines[CLOUD].state.value == "finished":
                break
            self.finish_tasks(now)
            now += step
            self.tick(now)
        return now

    # --- delivery ----------------------------------------------------------------

    def _children(self, node: str) -> list[str]:
        return sorted(c for c, p in self.parent.items() if p == node)

    def _route(self, node: str, command: Command) -> None:
        match command:
            case BroadcastModel():
                for child in self._children(node):
                    self.post(child, ModelReceived(
                        run=RUN, round=command.round, weights=command.weights,
                        selected=child in command.selected, config=command.config,
                        model_id=command.request_id,
                    ))  # fmt: skip
            case PublishManifest():
                self.manifest[node] = command
                for child in self._children(node):
                    self.post(child, self._manifest_event(command))
            case SendUpdate():
                self.post(self.parent[node], UpdateReceived(
                    sender=NodeId(node), run=RUN, round=command.round, weights=command.weights,
                    num_examples=command.num_examples, encoding=command.encoding,
                    metrics=command.metrics, update_id=f"{node}:{command.round}:{len(self.sent[node])}",
                ))  # fmt: skip
            case SendFailure():
                self.post(self.parent[node], UpdateFailed(
                    sender=NodeId(node), run=RUN, round=command.round, reason=command.reason,
                ))  # fmt: skip
            case Train() | Evaluate():
                self.tasks[node] = command
            case CancelTraining():
                self.tasks.pop(node, None)
            case SwitchParent():
                old = self.parent[node]
                self.parent[node] = command.parent
                self.post(old, NodeLeft(node=NodeId(node), reason="re-homed"))
                if command.parent in self.manifest:
                    self.post(node, self._manifest_event(self.manifest[command.parent]))
                examples = self.examples.get(node, 0)
                self.post(command.parent, NodeJoined(node=NodeId(node), num_examples=examples))

    @staticmethod
    def _manifest_event(m: PublishManifest) -> ManifestReceived:
        return ManifestReceived(run=m.run, round=m.round, state=m.state)

    # --- reading the transcript -------------------------------------------------

    def of(self, node: str, kind: type[Any]) -> list[Any]:
        return [c for c in self.sent[node] if isinstance(c, kind)]

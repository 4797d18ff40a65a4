"""Per-level metrics of a hierarchical run, merged into the cloud's ``metrics.jsonl``.

The cloud's rows are the centralized server's (DESIGN.md section 3). The
edges report through the `EdgeObserver` callbacks of their runtimes (this
process only: an edge run as a ``fedbus node`` agent elsewhere reports
nothing here), and `HierarchicalResults` adds to the row of cloud round r:

- ``edge_accuracy``: each edge's uploaded model of round r on the test split;
- ``edge_participants``: the distinct devices (or sub-edges) in its task;
- ``edge_rejected``: per edge, the updates its validators and its round
  rules rejected in the task's local rounds, by reason (``{}``: none);
- under ``protocol.evaluate: federated``, ``edge_eval_accuracy``,
  ``edge_eval_loss`` and ``edge_eval_num_examples``: the sample-weighted
  mean of the evaluations of the global model of round r by the devices
  below each edge, the same model and the same weighting as the cloud's
  ``accuracy`` (devices evaluate the model they receive, so these come with
  the tasks of round r + 1, or with the final evaluation).

`LevelMonitor` also writes each edge's checkpoint (`fedbus.nodes.edge_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedbus.learning.trainer import Trainer
from fedbus.nodes import ResultsWriter
from fedbus.nodes.edge import EdgeObserver
from fedbus.nodes.edge_checkpoint import EdgeCheckpoint, EdgeCheckpoints
from fedbus.protocols.fedavg import RoundClosed, SendUpdate
from fedbus.protocols.hierarchical import TaskEnded

__all__ = ["HierarchicalResults", "LevelMonitor"]


class LevelMonitor(EdgeObserver):
    """Keeps each edge's upload and task report per cloud round, and its checkpoints.

    Args:
        checkpoints: where edge checkpoints go; None writes none.
    """

    def __init__(self, checkpoints: EdgeCheckpoints | None = None) -> None:
        self.uploads: dict[int, dict[str, SendUpdate]] = {}
        self.reports: dict[int, dict[str, TaskEnded]] = {}
        self.local_rounds: dict[str, int] = {}
        self.checkpoints = checkpoints

    def on_local_round(self, edge: str, closed: RoundClosed) -> None:
        """Count the edge's local rounds (the display shows them)."""
        self.local_rounds[edge] = self.local_rounds.get(edge, 0) + 1

    def on_task_done(self, edge: str, top_round: int, update: SendUpdate) -> None:
        """Keep the model ``edge`` sent up for ``top_round`` (not an evaluation's empty one)."""
        if update.weights:
            self.uploads.setdefault(top_round, {})[edge] = update

    def on_task_ended(self, edge: str, report: TaskEnded) -> None:
        """Keep ``edge``'s report and write its checkpoint."""
        self.reports.setdefault(report.top_round, {})[edge] = report
        if self.checkpoints is not None:
            self.checkpoints.record(
                edge,
                EdgeCheckpoint(
                    top_round=report.top_round, local_base=report.local_base,
                    aggregator_state=report.aggregator_state,
                ),
            )  # fmt: skip


class HierarchicalResults(ResultsWriter):
    """The cloud's results folder, with per-edge metrics merged into each row.

    Args:
        out: the folder.
        monitor: the edges' reports.
        evaluator: scores each edge's uploaded model on the test split.
        federated: ``protocol.evaluate`` is ``federated`` (the ``edge_eval_*`` keys).
        kwargs: `ResultsWriter`'s (``resume_round``).
    """

    def __init__(
        self,
        out: Path,
        monitor: LevelMonitor,
        evaluator: Trainer,
        *,
        federated: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(out, **kwargs)
        self._monitor = monitor
        self._evaluator = evaluator
        self._federated = federated

    def append(self, row: Mapping[str, Any]) -> None:
        """Add the ``edge_*`` keys (in place: the display sees them); see the module docstring."""
        done = int(row["round"])
        uploads = self._monitor.uploads.pop(done, {})
        reports = self._monitor.reports.pop(done, {})
        if isinstance(row, dict):
            if uploads:
                row["edge_accuracy"] = {
                    edge: float(self._evaluator.evaluate(u.weights).accuracy)
                    for edge, u in sorted(uploads.items())
                }
                row["edge_participants"] = {
                    edge: int(u.metrics.get("edge_participants", 0))
                    for edge, u in sorted(uploads.items())
                }
            trained = {e: r for e, r in sorted(reports.items()) if r.kind == "train"}
            if trained:
                row["edge_rejected"] = {e: dict(r.rejected) for e, r in trained.items()}
            if self._federated:
                row.update(_evaluations(self._monitor.reports.get(done + 1, {})))
        super().append(row)

    def finish(
        self, weights: Mapping[str, Any], summary: Mapping[str, Any], *, title: str
    ) -> dict[str, Any]:
        """The summary says ``protocol: hierarchical``."""
        return super().finish(weights, {**summary, "protocol": "hierarchical"}, title=title)


def _evaluations(reports: Mapping[str, TaskEnded]) -> dict[str, dict[str, Any]]:
    found = {e: r.evaluation for e, r in sorted(reports.items()) if r.evaluation}
    if not found:
        return {}
    return {
        "edge_eval_accuracy": {e: ev.get("accuracy") for e, ev in found.items()},
        "edge_eval_loss": {e: ev.get("loss") for e, ev in found.items()},
        "edge_eval_num_examples": {e: int(ev.get("num_examples", 0)) for e, ev in found.items()},
    }

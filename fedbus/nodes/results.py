"""The results folder of an aggregating node (DESIGN.md section 3).

Files:

- ``metrics.jsonl``: one JSON object per completed round (`ROW_KEYS` at least);
- ``summary.json``: the run at a glance (`SUMMARY_KEYS` at least);
- ``model.msgpack``: the final global model (`fedbus.nodes.modelfile`), whose
  SHA-256 is ``model_sha256``;
- ``plot.png``: accuracy and bytes per round (skipped without matplotlib);
- ``checkpoint.msgpack``: the state after the last completed round, for
  ``fedbus run --resume DIR``; ``topology.yaml``: the topology the run used;
- ``model.tflite``: with ``--export-tflite``, the newest global model as a
  TFLite file, rewritten (atomically) after each completed round.

A resumed run reopens the same folder: metrics rows after the checkpoint's
round (written by the interrupted run after its last checkpoint) are dropped,
so every round appears once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from fedbus.nodes.modelfile import (
    Checkpoint,
    atomic_write,
    encode_model,
    sha256_hex,
    write_checkpoint,
)
from fedbus.nodes.plot import write_plot

__all__ = [
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "MODEL_TFLITE_FILE",
    "PLOT_FILE",
    "ROW_KEYS",
    "SUMMARY_FILE",
    "SUMMARY_KEYS",
    "TOPOLOGY_FILE",
    "ResultsWriter",
]

METRICS_FILE: Final = "metrics.jsonl"
SUMMARY_FILE: Final = "summary.json"
MODEL_FILE: Final = "model.msgpack"
MODEL_TFLITE_FILE: Final = "model.tflite"
PLOT_FILE: Final = "plot.png"
CHECKPOINT_FILE: Final = "checkpoint.msgpack"
TOPOLOGY_FILE: Final = "topology.yaml"

ROW_KEYS: Final = (
    "round",
    "wall_s",
    "elapsed_s",
    "accuracy",
    "loss",
    "participants",
    "dropped",
    "rejected",
    "bytes_up",
    "bytes_down",
)
SUMMARY_KEYS: Final = (
    "name",
    "protocol",
    "rounds_completed",
    "final_accuracy",
    "final_loss",
    "wall_s",
    "bytes_total",
    "model_sha256",
    "broker",
    "run",
    "seed",
    "success",
    "reason",
)


def _clean(value: Any) -> Any:
    """JSON has no NaN: a non-finite metric is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ResultsWriter:
    """Writes one run's results folder, row by row, then the summary at the end.

    Args:
        out: the folder (created if missing).
        resume_round: the checkpoint round of a resumed run; metrics rows
            after it are dropped. 0 starts a fresh ``metrics.jsonl``.
        tflite: turns global weights into ``.tflite`` bytes (a compiled
            template, patched; `fedbus.launch.tflite`); None exports none.
    """

    def __init__(
        self,
        out: Path,
        *,
        resume_round: int = 0,
        tflite: Callable[[Mapping[str, Any]], bytes] | None = None,
    ) -> None:
        self.out = out
        self.tflite = tflite
        out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        metrics = out / METRICS_FILE
        if resume_round > 0 and metrics.exists():
            for line in metrics.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line of an interrupted write
                if isinstance(row, dict) and int(row.get("round", 0)) <= resume_round:
                    self.rows.append(row)
        atomic_write(metrics, b"".join(_line(r) for r in self.rows))

    @property
    def path(self) -> Path:
        """The results folder."""
        return self.out

    def write_topology(self, text: str) -> None:
        """Keep a copy of the topology the run used."""
        if text:
            atomic_write(self.out / TOPOLOGY_FILE, text.encode("utf-8"))

    def append(self, row: Mapping[str, Any]) -> None:
        """Append one round's row to ``metrics.jsonl`` (flushed at once)."""
        clean = {k: _clean(v) for k, v in row.items()}
        self.rows.append(clean)
        with (self.out / METRICS_FILE).open("ab") as fh:
            fh.write(_line(clean))
            fh.flush()

    def checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write ``checkpoint.msgpack`` atomically."""
        write_checkpoint(self.out / CHECKPOINT_FILE, checkpoint)

    def export_tflite(self, weights: Mapping[str, Any]) -> None:
        """Write ``model.tflite`` for ``weights`` atomically (no-op without an exporter).

        Atomic because a board or ``fedbus predict`` may read the file while
        the next round replaces it.
        """
        if self.tflite is not None:
            atomic_write(self.out / MODEL_TFLITE_FILE, self.tflite(weights))

    def finish(
        self, weights: Mapping[str, Any], summary: Mapping[str, Any], *, title: str
    ) -> dict[str, Any]:
        """Write the model, the summary and the plot; return the summary written.

        ``summary`` gives the keys other than the ones derived here
        (``rounds_completed``, ``final_accuracy``, ``final_loss``, ``model_sha256``).
        """
        model = encode_model(weights)
        atomic_write(self.out / MODEL_FILE, model)
        last = self.rows[-1] if self.rows else {}
        full: dict[str, Any] = {
            **summary,
            "rounds_completed": int(last.get("round", 0)),
            "final_accuracy": last.get("accuracy"),
            "final_loss": last.get("loss"),
            "model_sha256": sha256_hex(model),
        }
        full = {k: _clean(v) for k, v in full.items()}
        text = json.dumps(full, indent=2, sort_keys=True) + "\n"
        atomic_write(self.out / SUMMARY_FILE, text.encode("utf-8"))
        write_plot(self.out / PLOT_FILE, self.rows, title=title)
        return full


def _line(row: Mapping[str, Any]) -> bytes:
    return (json.dumps(row, sort_keys=False, allow_nan=False) + "\n").encode("utf-8")

"""Edge checkpoints: where a resumed hierarchical run restarts each edge from.

The cloud's ``checkpoint.msgpack`` (`fedbus.nodes.modelfile`) holds the
global model after round r. An edge keeps little across rounds: how many
local rounds it has used (its children's round numbers, and with them their
training seeds and its selections) and its aggregator's state (FedAvgM's
momentum, FedOpt's moments). Both come with every `TaskEnded`; this module
writes them to ``edges/<edge-id>.msgpack`` next to the cloud's checkpoint,
atomically, and reads back the entry of the cloud's checkpoint round.

Why several entries: an edge may finish its task for round r + 1 before the
cloud closes round r + 1 and writes that checkpoint; a run interrupted
between the two resumes from round r, so the file keeps the last ``KEEP``
tasks' entries and `read_edge_checkpoint` takes the newest one for a top
round not after the cloud's. Plain MessagePack as the other files; no pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from fedbus.messages import Tensor, tensors_from_arrays, tensors_to_arrays
from fedbus.nodes.modelfile import atomic_write, read_versioned

__all__ = ["EDGES_DIR", "KEEP", "EdgeCheckpoint", "EdgeCheckpoints", "read_edge_checkpoint"]

EDGES_DIR: Final = "edges"
"""The folder of edge checkpoints inside a results folder."""

KEEP: Final = 3
"""Entries kept per edge (see the module docstring)."""

_FORMAT: Final = 1


class _Entry(msgspec.Struct, frozen=True, kw_only=True):
    top_round: int
    local_base: int
    aggregator_state: dict[str, Tensor] = msgspec.field(default_factory=dict)


class _File(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    edge: str
    run: str
    entries: list[_Entry]


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(_File)


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeCheckpoint:
    """One edge's state after its task for top-level round ``top_round``."""

    top_round: int
    local_base: int
    aggregator_state: Mapping[str, npt.NDArray[Any]] = field(default_factory=dict)


class EdgeCheckpoints:
    """Writes every edge's recent entries under ``directory`` (one file per edge).

    Args:
        directory: ``<results>/edges``.
        run: the run id (a resumed run keeps it; a file of another run is not read).
    """

    def __init__(self, directory: Path, run: str) -> None:
        self.directory = directory
        self.run = run
        self._entries: dict[str, list[_Entry]] = {}

    def record(self, edge: str, checkpoint: EdgeCheckpoint) -> None:
        """Add ``checkpoint`` to ``edge``'s file (the last `KEEP` entries), atomically."""
        entries = self._entries.setdefault(edge, [])
        entries.append(
            _Entry(
                top_round=checkpoint.top_round, local_base=checkpoint.local_base,
                aggregator_state=tensors_from_arrays(checkpoint.aggregator_state),
            )
        )  # fmt: skip
        del entries[:-KEEP]
        record = _File(format=_FORMAT, edge=edge, run=self.run, entries=list(entries))
        atomic_write(self.directory / f"{edge}.msgpack", _encoder.encode(record))


def read_edge_checkpoint(
    directory: Path, edge: str, *, run: str, top_round: int
) -> EdgeCheckpoint | None:
    """``edge``'s newest entry for a top round <= ``top_round`` of ``run`` (None: start fresh).

    Raises:
        DecodeError: the file is not an edge checkpoint, or of another format.
    """
    path = directory / f"{edge}.msgpack"
    record = read_versioned(path, _decoder, kind="edge checkpoint", version=_FORMAT)
    if record is None or record.run != run or record.edge != edge:
        return None
    usable = [e for e in record.entries if e.top_round <= top_round]
    if not usable:
        return None
    entry = max(reversed(usable), key=lambda e: e.top_round)  # the latest of a tie
    state = {k: np.array(v) for k, v in tensors_to_arrays(entry.aggregator_state).items()}
    return EdgeCheckpoint(
        top_round=entry.top_round, local_base=entry.local_base, aggregator_state=state
    )

"""Checkpoints and ``--resume`` of a gossip run (metropolis mixing).

The monitor calls `GossipCheckpoints.record` as it writes the row of round
r: the model of every peer that reported r goes to ``peers/<id>.msgpack``
(`fedbus.nodes.peer_checkpoint`), then ``checkpoint.msgpack`` says the run
completed round r (its model: the honest peers' average, as
``model.msgpack``). ``fedbus run --resume DIR`` then restarts every peer from
its own file, with the same run id, and the results writer keeps the rows up
to the checkpoint's round (`resume_state`).

Push-sum is refused: its state is a (numerator, mass) pair whose shares are
in flight between peers, so a per-peer file cannot restore it consistently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbus.aggregation import Arrays
from fedbus.errors import ConfigError
from fedbus.nodes import ResultsWriter
from fedbus.nodes.modelfile import Checkpoint
from fedbus.nodes.peer_checkpoint import (
    PEERS_DIR,
    PeerCheckpoint,
    read_peer_checkpoint,
    write_peer_checkpoint,
)
from fedbus.topology import Topology

__all__ = ["GossipCheckpoints", "ResumeState", "resume_state"]


@dataclass(slots=True)
class ResumeState:
    """Where a resumed run restarts: its round, and each peer's own checkpoint."""

    round: int = 0
    elapsed_s: float = 0.0
    peers: dict[str, PeerCheckpoint] = field(default_factory=dict)

    def start_round(self, peer: str) -> int:
        """The rounds ``peer`` has completed (0: it starts afresh)."""
        entry = self.peers.get(peer)
        return entry.round if entry is not None else 0


def resume_state(
    topology: Topology, out: Path | None, resume: Checkpoint | None, peers: list[str]
) -> ResumeState:
    """Each local peer's restart point from ``out`` (an empty state without ``resume``).

    Raises:
        ConfigError: push-sum mixing, or ``--resume`` without a results folder.
        DecodeError: a peer checkpoint is unreadable.
    """
    if resume is None:
        return ResumeState()
    if topology.protocol.mixing != "metropolis":
        raise ConfigError("--resume supports gossip with mixing 'metropolis' only", path="--resume")
    if out is None:
        raise ConfigError("--resume needs the run's results folder", path="--resume")
    found = {p: read_peer_checkpoint(out / PEERS_DIR, p, run=resume.run) for p in peers}
    return ResumeState(
        round=resume.round, elapsed_s=resume.elapsed_s,
        peers={p: c for p, c in found.items() if c is not None},
    )  # fmt: skip


class GossipCheckpoints:
    """Writes the peer files and the run's checkpoint as rows are written.

    Args:
        results: the run's results writer (its folder and checkpoint file).
        topology: the topology (its name and seed go into the checkpoint).
        run: the run id.
        text: the topology file's text.

    Call `record` after the row of the round went to ``results`` (its bytes
    are counted from the rows written, those kept by a resume included).
    """

    def __init__(
        self,
        results: ResultsWriter,
        topology: Topology,
        *,
        run: str,
        text: str = "",
    ) -> None:
        self.results = results
        self.topology = topology
        self.run = run
        self.text = text

    def record(
        self, round_: int, models: Mapping[str, Arrays], average: Arrays, row: Mapping[str, Any]
    ) -> None:
        """Checkpoint round ``round_``: each reporting peer's model, then the run's file."""
        directory = self.results.path / PEERS_DIR
        for peer, weights in sorted(models.items()):
            write_peer_checkpoint(
                directory, peer, run=self.run,
                checkpoint=PeerCheckpoint(round=round_, weights=weights),
            )  # fmt: skip
        self.results.checkpoint(
            Checkpoint(
                name=self.topology.name, run=self.run, round=round_, seed=self.topology.seed,
                elapsed_s=float(row.get("elapsed_s", 0.0)),
                bytes_total=sum(int(r.get("bytes_up", 0)) + int(r.get("bytes_down", 0))
                                for r in self.results.rows),
                weights=average, topology=self.text,
            )
        )  # fmt: skip

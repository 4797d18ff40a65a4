"""``fedbus run`` for the hierarchical and gossip protocols: progress display and exit codes.

Same contract as the centralized path in `fedbus.launch.command` (exit 0,
1 with a one-line reason, 2 for bad input, 130 after Ctrl-C), with a display
that shows the levels (hierarchical: the cloud's row and each edge's model
accuracy and participants) or the peers (gossip: mean, min and max
accuracy and the consensus distance). The run also draws the topology
(``topology.png``, `fedbus.nodes.topology_plot`). ``--resume DIR``
continues a hierarchical run from the cloud's last completed global round
(the edges restart from their checkpoints in DIR), and a gossip run with
metropolis mixing from each peer's checkpoint there (push-sum refuses it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from fedbus.errors import FedbusError
from fedbus.launch.command import Progress, UsageError, _resume, default_out
from fedbus.nodes import Checkpoint
from fedbus.nodes.topology_plot import TOPOLOGY_PLOT_FILE, write_topology_plot
from fedbus.topology import NodeRole, Topology

__all__ = ["LevelProgress", "PeerProgress", "run_kind_command"]


def _num(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


class LevelProgress(Progress):
    """The centralized line for the cloud, then one compact line for the edges."""

    def on_round(self, row: Mapping[str, Any]) -> None:
        """Print the cloud's row and the per-edge metrics merged into it."""
        super().on_round(row)
        accuracy = row.get("edge_accuracy") or {}
        participants = row.get("edge_participants") or {}
        rejected = row.get("edge_rejected") or {}
        if accuracy:
            parts = [
                f"{edge} {_num(acc)} ({participants.get(edge, '?')} devices"
                + (f", {sum(rejected[edge].values())} rejected" if rejected.get(edge) else "")
                + ")"
                for edge, acc in accuracy.items()
            ]
            print("    edges: " + ", ".join(parts), file=self.stream, flush=True)


class PeerProgress:
    """One line per gossip round: mean/min/max accuracy over the peers, consensus distance."""

    def __init__(self, rounds: int, stream: TextIO | None = None) -> None:
        self.rounds = rounds
        self.stream = stream if stream is not None else sys.stdout

    def __call__(self, row: Mapping[str, Any]) -> None:
        """Print one row."""
        rejected = sum(row.get("rejected", {}).values())
        print(
            f"round {row['round']}/{self.rounds}  accuracy {_num(row.get('accuracy'))} "
            f"(min {_num(row.get('accuracy_min'))}, max {_num(row.get('accuracy_max'))})  "
            f"consensus {_num(row.get('consensus_distance'))}  peers {row['participants']}  "
            f"away {row['dropped']}  rejected {rejected}  "
            f"traffic {(row['bytes_up'] + row['bytes_down']) / 1e6:.2f} MB",
            file=self.stream,
            flush=True,
        )


def _done(resume: Checkpoint | None) -> int:
    return resume.round if resume is not None else 0


def run_kind_command(args: argparse.Namespace, topology: Topology) -> int:
    """Run a hierarchical or gossip ``topology`` for ``fedbus run`` (see the module docstring)."""
    resume = None
    if args.resume:
        if topology.protocol.kind == "gossip" and topology.protocol.mixing != "metropolis":
            print("fedbus run: --resume is not supported for push_sum gossip", file=sys.stderr)
            return 2
        if args.out and Path(args.out) != Path(args.resume):
            print("fedbus run: --resume writes into its own folder; drop --out", file=sys.stderr)
            return 2
        try:
            resume = _resume(args.resume, topology)
        except UsageError as exc:
            print(exc, file=sys.stderr)
            return 2
    out = Path(args.resume) if resume is not None else Path(args.out or default_out(topology.name))
    text = Path(args.topology).read_text(encoding="utf-8")
    p, kind = topology.protocol, topology.protocol.kind
    if kind == "gossip":
        shape = f"{len(topology.nodes.peers)} peers, {p.mixing} mixing"
    else:
        edges = len(topology.ids(NodeRole.EDGE))
        shape = f"{edges} edges, {len(topology.ids(NodeRole.CLIENT))} devices, {p.edge_rounds} edge rounds"
    start = f", resuming after round {resume.round}" if resume is not None else ""
    print(
        f"fedbus run {topology.name}: {kind}, {shape}, {p.rounds} rounds, "
        f"broker {topology.broker.url}{start}; results in {out}",
        flush=True,
    )
    from fedbus.launch.robustness import describe_attacks

    for attack in describe_attacks(topology):  # every kind prints its attackers (issue 5)
        print(f"attack {attack['describe']} by {', '.join(attack['nodes']) or 'none'}")
    out.mkdir(parents=True, exist_ok=True)
    write_topology_plot(out / TOPOLOGY_PLOT_FILE, topology)
    base_dir = Path(args.topology).parent
    try:
        if kind == "gossip":
            from fedbus.launch.gossip import run_gossip

            gossip = asyncio.run(
                run_gossip(topology, out=out, base_dir=base_dir, topology_text=text,
                           on_row=PeerProgress(p.rounds), resume=resume)
            )  # fmt: skip
            success, reason, summary = gossip.success, gossip.reason, gossip.summary or {}
        else:
            from fedbus.launch.hierarchical import run_hierarchical

            hier = asyncio.run(
                run_hierarchical(topology, out=out, base_dir=base_dir, topology_text=text,
                                 observer=LevelProgress(p.rounds, start_round=_done(resume)),
                                 resume=resume)
            )  # fmt: skip
            success, reason = hier.server.success, hier.server.reason
            summary = hier.server.summary or {}
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except (FedbusError, OSError) as exc:
        print(f"fedbus run failed: {exc}", file=sys.stderr)
        return 1
    if not success:
        print(f"fedbus run failed: {reason}", file=sys.stderr)
        return 1
    print(
        f"done: {reason}; final accuracy {_num(summary.get('final_accuracy'))}, "
        f"{summary.get('wall_s', 0.0):.1f} s; results in {out}",
        flush=True,
    )
    return 0

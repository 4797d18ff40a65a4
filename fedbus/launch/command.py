"""``fedbus run`` and ``fedbus node``: argument parsing, progress display, exit codes.

Exit codes: 0 success; 1 the run failed (one-line reason on stderr); 2 the
topology or the command line is unusable (every problem printed, as
``fedbus validate`` does); 130 interrupted (Ctrl-C), after stopping
everything this process started.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from fedbus.errors import ConfigError, DecodeError, FedbusError
from fedbus.launch.build import unsupported_reason
from fedbus.launch.tflite import TfliteOptions, add_tflite_arguments
from fedbus.launch.tflite import model_spec as tflite_model_spec
from fedbus.nodes import Checkpoint, ServerObserver, read_checkpoint
from fedbus.nodes.results import CHECKPOINT_FILE
from fedbus.protocols.fedavg import RoundFailed
from fedbus.topology import Topology, TopologyError, apply_overrides, load_topology

__all__ = [
    "Progress",
    "UsageError",
    "add_node_arguments",
    "add_run_arguments",
    "default_out",
    "load",
    "run_command",
]


class UsageError(Exception):
    """A problem with the topology or the command line: exit 2 with this message."""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the arguments of ``fedbus run`` (DESIGN.md section 3)."""
    parser.add_argument("topology", metavar="TOPOLOGY.yaml", help="the topology file")
    parser.add_argument("--out", metavar="DIR", help="results folder (default runs/<name>-<time>/)")
    parser.add_argument("--seed", type=int, help="replace the topology's seed")
    parser.add_argument("--rounds", type=int, help="replace protocol.rounds")
    parser.add_argument(
        "--broker", metavar="URL", help="replace the broker URL (or memory/embedded)"
    )
    parser.add_argument(
        "--resume", metavar="DIR", help="continue the interrupted run whose results are in DIR"
    )
    parser.add_argument(
        "--workers", type=int, default=0, metavar="N",
        help="host the simulated clients in N worker processes (centralized runs over an MQTT "
        "broker; uses N more cores; docs/running.md)",
    )  # fmt: skip
    add_tflite_arguments(parser)


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the arguments of ``fedbus node`` (DESIGN.md section 3)."""
    parser.add_argument("topology", metavar="TOPOLOGY.yaml", help="the topology file")
    parser.add_argument("--id", required=True, metavar="NODE_ID", help="which node to run")
    parser.add_argument("--broker", metavar="URL", help="the broker to connect to")
    parser.add_argument("--data", metavar="FILE", help="this node's own data (.npz with x, y)")
    parser.add_argument("--out", metavar="DIR", help="results folder of an aggregating node")
    add_tflite_arguments(parser)


def default_out(name: str) -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>``."""
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def load(path: str, **overrides: Any) -> Topology:
    """Load, override and check a topology for running.

    Raises:
        UsageError: invalid file, bad override, or a protocol not runnable yet.
    """
    try:
        from fedbus.launch.robustness import check_aggregator

        loaded = load_topology(path, check_aggregator=check_aggregator)
        topology = apply_overrides(loaded, **overrides)
    except TopologyError as exc:
        count = len(exc.problems)
        raise UsageError(
            f"{exc.format()}\n{path}: invalid ({count} problem{'s' * (count > 1)})"
        ) from exc
    except (ConfigError, OSError) as exc:
        raise UsageError(f"{path}: {exc}") from exc
    from fedbus.launch.robustness import unsupported_robustness

    reason = unsupported_reason(topology) or unsupported_robustness(topology)
    if reason is not None:
        raise UsageError(f"{path}: {reason}")
    return topology


class Progress(ServerObserver):
    """One line per round on ``stream``; a waiting line while nodes join."""

    def __init__(self, rounds: int, stream: TextIO | None = None, *, start_round: int = 0) -> None:
        self.rounds = rounds
        # sys.stdout is looked up now, not when the module was imported: it may
        # have been replaced since (pytest's capsys, a redirecting caller).
        self.stream = stream if stream is not None else sys.stdout
        self._last_join = 0.0
        self._round_seen = start_round > 0

    def on_joined(self, joined: int, expected: int | None) -> None:
        """Print how many nodes joined (at most once a second, and when all are in)."""
        if self._round_seen:
            return
        now = time.monotonic()
        if expected is not None and joined >= expected:
            self._print(f"all {joined} nodes joined")
        elif now - self._last_join >= 1.0:
            self._last_join = now
            self._print(f"waiting for nodes: {joined}/{expected or '?'} joined")

    def on_round(self, row: Mapping[str, Any]) -> None:
        """Print a round's row."""
        self._round_seen = True
        rejected = sum(row.get("rejected", {}).values())
        acc, loss = row.get("accuracy"), row.get("loss")
        self._print(
            f"round {row['round']}/{self.rounds}  accuracy {_num(acc)}  loss {_num(loss)}  "
            f"participants {row['participants']}  dropped {row['dropped']}  rejected {rejected}  "
            f"up {row['bytes_up'] / 1e6:.2f} MB  down {row['bytes_down'] / 1e6:.2f} MB  "
            f"wall {row['wall_s']:.2f} s"
        )

    def on_round_failed(self, failed: RoundFailed) -> None:
        """Print a failed attempt."""
        self._print(f"round {failed.round} attempt {failed.attempt} failed: {failed.reason}")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def _num(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def _resume(directory: str, topology: Topology) -> Checkpoint:
    path = Path(directory) / CHECKPOINT_FILE
    try:
        checkpoint = read_checkpoint(path)
    except FileNotFoundError as exc:
        raise UsageError(f"--resume {directory}: no {CHECKPOINT_FILE} there") from exc
    except (DecodeError, OSError) as exc:
        raise UsageError(f"--resume {directory}: {exc}") from exc
    if checkpoint.name != topology.name:
        raise UsageError(
            f"--resume {directory}: the checkpoint is of {checkpoint.name!r}, "
            f"the topology is {topology.name!r}"
        )
    if checkpoint.seed != topology.seed:
        raise UsageError(
            f"--resume {directory}: the checkpoint ran with seed {checkpoint.seed}, "
            f"not {topology.seed} (drop --seed or pass --seed {checkpoint.seed})"
        )
    return checkpoint


def run_command(args: argparse.Namespace) -> int:
    """``fedbus run``: run a whole federation here; see the module docstring for exit codes."""
    from fedbus.launch.federation import run_federation
    from fedbus.launch.robustness import describe_attacks

    try:
        topology = load(args.topology, rounds=args.rounds, seed=args.seed, broker_url=args.broker)
        tflite = TfliteOptions.from_args(args)
        if topology.protocol.kind != "centralized" and (tflite.export or tflite.serve):
            raise UsageError(
                "fedbus run: the TFLite flags apply to centralized runs only (for now)"
            )
        if tflite.export or tflite.serve:
            try:
                tflite_model_spec(topology)  # a factory model: refused before anything starts
            except ConfigError as exc:
                raise UsageError(f"fedbus run: {exc}") from exc
        if args.workers < 0:
            raise UsageError(f"fedbus run: --workers must be >= 0, got {args.workers}")
        if args.workers and (topology.protocol.kind != "centralized" or tflite.serve):
            raise UsageError(
                "fedbus run: --workers applies to centralized runs without --serve-tflite"
            )
        if args.workers and topology.broker.kind == "memory":
            raise UsageError(
                "fedbus run: --workers needs an MQTT broker (embedded or a URL); the in-process "
                "bus cannot span processes"
            )
        if topology.protocol.kind != "centralized":
            from fedbus.launch.kinds import run_kind_command

            return run_kind_command(args, topology)
        resume = _resume(args.resume, topology) if args.resume else None
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    if resume is not None and args.out and Path(args.out) != Path(args.resume):
        print("fedbus run: --resume writes into its own folder; drop --out", file=sys.stderr)
        return 2
    out = Path(args.resume) if resume is not None else Path(args.out or default_out(topology.name))
    text = Path(args.topology).read_text(encoding="utf-8")
    p = topology.protocol
    start = f", resuming after round {resume.round}" if resume is not None else ""
    print(
        f"fedbus run {topology.name}: {len(topology.nodes.clients)} clients, {p.rounds} rounds, "
        f"broker {topology.broker.url}{start}; results in {out}",
        flush=True,
    )
    for attack in describe_attacks(topology):
        nodes = ", ".join(attack["nodes"]) or "none"
        print(f"attack {attack['describe']} by {nodes}", flush=True)
    external = topology.nodes.external
    if external:
        print(
            f"waiting for external node(s) {', '.join(external)}: start each with "
            f"fedbus node {args.topology} --id NODE_ID --broker URL",
            flush=True,
        )
    progress = Progress(p.rounds, start_round=resume.round if resume else 0)
    try:
        result = asyncio.run(
            run_federation(
                topology, out=out, base_dir=Path(args.topology).parent, topology_text=text,
                resume=resume, observer=progress, tflite=tflite, workers=args.workers,
            )
        )  # fmt: skip
    except KeyboardInterrupt:
        print(
            f"interrupted; everything started was stopped. Continue with: "
            f"fedbus run {args.topology} --resume {out}",
            file=sys.stderr,
        )
        return 130
    except (FedbusError, OSError) as exc:
        print(f"fedbus run failed: {exc}", file=sys.stderr)
        return 1
    outcome = result.server
    if not outcome.success:
        print(f"fedbus run failed: {outcome.reason}", file=sys.stderr)
        return 1
    summary = outcome.summary or {}
    print(
        f"done: {outcome.reason}; final accuracy {_num(summary.get('final_accuracy'))}, "
        f"{summary.get('wall_s', 0.0):.1f} s; results in {out}",
        flush=True,
    )
    return 0

"""The ``fedbus`` command line (DESIGN.md section 3).

Each sub-command lives in a small ``_add_<name>`` function that registers its
parser and handler, so commands can be added without touching the others.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from fedbus import __version__

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="fedbus", description="Federated learning over MQTT for IoT topologies."
    )
    parser.add_argument("--version", action="version", version=f"fedbus {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedbus`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level={0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    # `docker stop`, systemd and kill send SIGTERM: take the same clean-up path
    # as Ctrl-C, so nodes disconnect and a managed broker is stopped instead of
    # orphaned. (`fedbus broker` installs handlers of its own.)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _add_broker(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedbus broker``: run the embedded broker in the foreground (DESIGN.md section 3)."""
    parser = sub.add_parser(
        "broker",
        help="run the embedded MQTT broker until interrupted",
        description="Run mosquitto (or the slower pure-Python amqtt fallback) in the foreground "
        "until Ctrl-C. Beyond loopback it requires --password-file or TLS unless "
        "--allow-anonymous is given.",
    )
    from fedbus.broker.command import add_arguments

    add_arguments(parser)
    parser.set_defaults(handler=_run_broker)


def _run_broker(args: argparse.Namespace) -> int:
    from fedbus.broker.command import run

    return run(args)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Imported lazily: the demo pulls the transports, which `fedbus --help` need not load.
    from fedbus.demo import add_command

    add_command(sub)


def _add_validate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedbus validate``: check a topology file, print every problem (DESIGN.md section 3)."""
    parser = sub.add_parser(
        "validate",
        help="check a topology file and print every problem with its line",
        description="Check TOPOLOGY.yaml against the topology schema (docs/topology.md). Prints "
        "each problem as FILE:LINE: PATH: message and exits 2 if there is any; prints a one-line "
        "summary and exits 0 if the file is valid.",
    )
    parser.add_argument("topology", metavar="TOPOLOGY.yaml", help="the topology file")
    parser.set_defaults(handler=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    # Lazy: loading the schema pulls PyYAML, which other commands need not load.
    from fedbus.launch.robustness import check_aggregator
    from fedbus.topology import NodeRole, TopologyError, load_topology

    try:
        topology = load_topology(args.topology, check_aggregator=check_aggregator)
    except TopologyError as exc:
        print(exc.format(), file=sys.stderr)
        count = len(exc.problems)
        print(f"{args.topology}: invalid ({count} problem{'s' * (count > 1)})", file=sys.stderr)
        return 2
    counts = [
        f"{len(ids)} {role.value}{'s' * (len(ids) != 1)}"
        for role in NodeRole
        if (ids := topology.ids(role))
    ]
    external = len(topology.nodes.external)
    tail = f", {external} external" if external else ""
    print(
        f"{args.topology}: valid: {topology.name}, {topology.protocol.kind}, "
        f"{topology.protocol.rounds} rounds, {', '.join(counts)}{tail}"
    )
    return 0


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedbus run``: a whole federation in this process (DESIGN.md section 3)."""
    parser = sub.add_parser(
        "run",
        help="run a federation: broker, server and every non-external node, with results",
        description="Start the embedded broker (unless the topology or --broker names one), "
        "start every node not marked external, show progress, and write metrics.jsonl, "
        "summary.json, model.msgpack and a plot to DIR (docs/running.md). Exit 0 on success, "
        "1 when the run fails, 2 for an invalid topology, 130 when interrupted.",
    )
    # Lazy: the launcher pulls data, trainers and transports, which --help need not load.
    from fedbus.launch.command import add_run_arguments

    add_run_arguments(parser)
    parser.set_defaults(handler=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from fedbus.launch.command import run_command

    return run_command(args)


def _add_node(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedbus node``: one node of a topology as a long-lived agent (DESIGN.md section 3)."""
    parser = sub.add_parser(
        "node",
        help="run one node of a topology as an agent (another process or host)",
        description="Run node NODE_ID of TOPOLOGY.yaml against a broker: a client learns the "
        "run from the server's retained manifest, joins, trains when selected and exits 0 when "
        "the run finishes; a server writes its results to --out (docs/running.md).",
    )
    from fedbus.launch.command import add_node_arguments

    add_node_arguments(parser)
    parser.set_defaults(handler=_run_node)


def _run_node(args: argparse.Namespace) -> int:
    from fedbus.launch.agent import node_command

    return node_command(args)


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Lazy like the demo; the command module itself defers the writer and readers to its handler.
    from fedbus.learning.tflite.command import add_command

    add_command(sub)


def _add_predict(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Lazy like export: numpy at import, the TFLite runtime only when the command runs.
    from fedbus.learning.tflite.predict import add_command

    add_command(sub)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _add_deploy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Lazy like the demo: the generator pulls PyYAML and the topology schema only when run.
    from fedbus.deploy.command import add_command

    add_command(sub)


_COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_broker,
    _add_demo,
    _add_validate,
    _add_run,
    _add_node,
    _add_export,
    _add_predict,
    _add_deploy,
]


if __name__ == "__main__":
    sys.exit(main())

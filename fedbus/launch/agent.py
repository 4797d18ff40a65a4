"""``fedbus node``: one node of a topology as a long-lived agent (another process or host).

A client builds the same data as ``fedbus run`` (same partition for the same
id and seed) or loads its own file (``--data``), connects to the broker,
learns the run id from the server's retained manifest, joins, trains when
selected, and exits 0 when the manifest says the run finished. It waits for
a run indefinitely (that is what an agent does) but Ctrl-C ends it at once,
and its last will tells the server it left.

A server runs the protocol for the clients that join and writes the results
folder to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from fedbus.config import BrokerConfig
from fedbus.errors import ConfigError, FedbusError
from fedbus.launch.build import build_data, client_trainer, new_run_id
from fedbus.launch.command import Progress, UsageError, default_out, load
from fedbus.launch.federation import client_settings, make_server
from fedbus.launch.tflite import TfliteOptions, client_serving
from fedbus.launch.tflite import model_spec as tflite_model_spec
from fedbus.nodes import ClientNode
from fedbus.topology import NodeRole, Topology
from fedbus.transport.base import Transport, Will
from fedbus.transport.mqtt import MqttTransport

__all__ = ["node_command"]


def node_command(args: argparse.Namespace) -> int:
    """Run ``fedbus node``; exit 0 when the run finished, 1 on failure, 2 on bad input."""
    try:
        topology = load(args.topology, broker_url=args.broker)
        info = topology.node(args.id)
        config = topology.broker.config
        if config is None:
            raise UsageError(
                f"fedbus node needs a broker URL: the topology's broker is {topology.broker.kind!r}; "
                "pass --broker mqtt://HOST:PORT"
            )
        if args.data is not None and not info.holds_data:
            raise UsageError("--data applies to a data-holding node (client, device, peer) only")
        tflite = TfliteOptions.from_args(args)
        if tflite.export and info.role is not NodeRole.SERVER:
            raise UsageError("--export-tflite applies to the server only (the results folder)")
        if tflite.serve and info.role is not NodeRole.CLIENT:
            raise UsageError("--serve-tflite applies to a client only")
        if (tflite.export or tflite.serve) and topology.protocol.kind != "centralized":
            raise UsageError("the TFLite flags apply to centralized runs only (for now)")
        if tflite.export or tflite.serve:
            tflite_model_spec(topology)  # a factory model: ConfigError, exit 2
    except ConfigError as exc:
        print(f"fedbus node: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    if topology.protocol.kind != "centralized":
        from fedbus.launch.node_roles import run_role

        return run_role(args, topology, info, config)
    try:
        if info.role is NodeRole.SERVER:
            text = Path(args.topology).read_text(encoding="utf-8")
            return asyncio.run(_server(args, topology, config, text, tflite))
        return asyncio.run(_client(args, topology, config, tflite))
    except KeyboardInterrupt:
        print(f"fedbus node {args.id}: interrupted", file=sys.stderr)
        return 130
    except ConfigError as exc:
        print(f"fedbus node {args.id}: {exc}", file=sys.stderr)
        return 2
    except (FedbusError, OSError) as exc:
        print(f"fedbus node {args.id} failed: {exc}", file=sys.stderr)
        return 1


async def _client(
    args: argparse.Namespace, topology: Topology, config: BrokerConfig, tflite: TfliteOptions
) -> int:
    data = await asyncio.to_thread(build_data, topology, Path(args.topology).parent)
    trainer = client_trainer(topology, data, args.id, data_file=args.data)
    serving = client_serving(topology, trainer, int8=tflite.int8) if tflite.serve else None

    def connect(will: Will) -> Transport:
        return MqttTransport(config, args.id, will=will)

    print(
        f"fedbus node {args.id}: waiting for a run of {topology.name} at {config.url}", flush=True
    )
    node = ClientNode(trainer, connect, client_settings(topology, args.id), tflite=serving)
    outcome = await node.run()
    if outcome.status != "finished":
        print(f"fedbus node {args.id} failed: {outcome.reason or outcome.status}", file=sys.stderr)
        return 1
    served = (
        f"; TFLite accuracy on local data {serving.accuracy:.4f}"
        if serving and serving.accuracy is not None
        else ""
    )
    print(f"fedbus node {args.id}: the run finished{served}", flush=True)
    return 0


async def _server(
    args: argparse.Namespace,
    topology: Topology,
    config: BrokerConfig,
    text: str,
    tflite: TfliteOptions,
) -> int:
    data = await asyncio.to_thread(build_data, topology, Path(args.topology).parent)
    out = Path(args.out) if args.out else default_out(topology.name)
    server = make_server(
        topology, data, MqttTransport(config, args.id), run_id=new_run_id(topology.name),
        out=out, observer=Progress(topology.protocol.rounds), topology_text=text,
        broker={"kind": "url", "url": config.url}, tflite=tflite,
    )  # fmt: skip
    print(f"fedbus node {args.id}: serving {topology.name} at {config.url}; results in {out}")
    outcome = await server.run()
    if not outcome.success:
        print(f"fedbus node {args.id} failed: {outcome.reason}", file=sys.stderr)
        return 1
    print(f"done: {outcome.reason}; results in {out}", flush=True)
    return 0

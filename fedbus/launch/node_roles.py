"""``fedbus node`` for the hierarchical and gossip roles: the cloud, an edge, a device, a peer.

Each agent builds what ``fedbus run`` would build for its id (same data
partition, same namespaces, same graph) and connects to the broker(s) its
role needs: ``--broker`` (or the topology's URL) for the federation, and an
edge's own ``broker:`` URL for that edge's group. Run ids are learnt, as for
centralized clients: an edge reads its parent's retained manifest before it
starts (its machine needs the id), a device learns it from its parent's
manifest, a peer from the first neighbour that answers. The cloud draws a
fresh run id and writes the results folder to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

from fedbus._types import RunId
from fedbus.config import BrokerConfig
from fedbus.errors import ConfigError
from fedbus.launch.build import build_data, client_trainer, new_run_id, server_trainer
from fedbus.launch.command import default_out
from fedbus.launch.hierarchical import (
    Connect,
    LevelMonitor,
    Plan,
    make_cloud,
    make_device,
    make_edge,
    run_edge,
)
from fedbus.launch.hierarchical_defenses import level_defenses
from fedbus.launch.kinds import LevelProgress
from fedbus.learning.seeds import init_seed
from fedbus.messages import Manifest
from fedbus.nodes.server import MANIFEST_CHANNEL
from fedbus.topology import NodeInfo, NodeRole, Topology
from fedbus.transport.base import Transport, Will
from fedbus.transport.messenger import Messenger
from fedbus.transport.mqtt import MqttTransport

__all__ = ["run_role"]


def _connector(config: BrokerConfig) -> Connect:
    def connect(node: str, will: Will | None) -> Transport:
        return MqttTransport(config, node, will=will)

    return connect


def child_connects(plan: Plan, config: BrokerConfig) -> dict[str, Connect]:
    """Each aggregator's children's broker for an agent: the federation's, or an edge's URL.

    Raises:
        ConfigError: an edge's broker is ``embedded`` (an agent cannot start one).
    """
    connects: dict[str, Connect] = {}
    for info in plan.infos.values():
        if info.role is NodeRole.SERVER:
            connects[info.id] = _connector(config)
        elif info.role is NodeRole.EDGE and info.parent is not None:
            spec = info.child_broker or info.broker
            if spec == info.broker:
                connects[info.id] = connects[info.parent]
            elif spec.config is not None:
                connects[info.id] = _connector(spec.config)
            else:
                raise ConfigError(
                    f"edge {info.id!r} has an embedded broker; an agent needs its URL",
                    path="nodes.edges",
                )
    return connects


async def learn_run(connect: Connect, node: str, namespace: str, parent: str) -> RunId:
    """Wait (as long as it takes) for ``parent``'s retained manifest of a live run."""
    async with (
        connect(node, None) as transport,
        Messenger(transport, node_id=node, run=namespace, strict_run=False) as messenger,
    ):
        await messenger.subscribe_broadcasts(parent, MANIFEST_CHANNEL)
        async for _topic, msg in messenger.messages():
            if isinstance(msg, Manifest) and msg.state != "finished":
                return RunId(msg.run)
    raise ConfigError(f"the connection closed before {parent} published a run")


async def _run(
    args: argparse.Namespace, topology: Topology, info: NodeInfo, config: BrokerConfig
) -> int:
    base = Path(args.topology).parent
    data = await asyncio.to_thread(build_data, topology, base)
    if info.role is NodeRole.PEER:
        from fedbus.launch.gossip import make_peer

        initial = server_trainer(topology, data).initial_weights(init_seed(topology.seed))
        connect = _connector(config)
        peer_node = make_peer(
            topology, data, info.id, lambda will: connect(info.id, will), run=None,
            initial=initial, data_file=args.data,
        )  # fmt: skip
        print(
            f"fedbus node {info.id}: joining the gossip of {topology.name} at {config.url}",
            flush=True,
        )
        peer = await peer_node.run()
        ok, reason = peer.status == "finished", peer.reason or peer.status
    else:
        plan = Plan.of(topology)
        connects = child_connects(plan, config)
        if info.role is NodeRole.SERVER:
            out = Path(args.out) if args.out else default_out(topology.name)
            text = await asyncio.to_thread(Path(args.topology).read_text, encoding="utf-8")
            cloud = make_cloud(
                plan, data, connects[info.id](info.id, None), run=RunId(new_run_id(topology.name)),
                out=out, monitor=LevelMonitor(), observer=LevelProgress(topology.protocol.rounds),
                topology_text=text, broker={"kind": "url", "url": config.url},
            )  # fmt: skip
            print(f"fedbus node {info.id}: serving {topology.name}; results in {out}", flush=True)
            outcome = await cloud.run()
            ok, reason = outcome.success, outcome.reason
        elif info.role is NodeRole.EDGE:
            assert info.parent is not None
            up = connects[info.parent]
            print(f"fedbus node {info.id}: waiting for {info.parent}'s run", flush=True)
            run = await learn_run(up, info.id, plan.namespaces[info.parent], info.parent)
            edge_node, conns = make_edge(
                plan, info.id, run, up, connects[info.id], shared=up is connects[info.id],
                defenses=level_defenses(topology, data), connects=connects,
            )  # fmt: skip
            edge = await run_edge(edge_node, conns)
            ok, reason = edge.status == "finished", edge.reason or edge.status
        else:
            trainer = client_trainer(topology, data, info.id, data_file=args.data)
            device = make_device(plan, info.id, trainer, connects, None)
            print(f"fedbus node {info.id}: waiting for a run of {topology.name}", flush=True)
            result = await device.run()
            ok, reason = result.status == "finished", result.reason or result.status
    if not ok:
        print(f"fedbus node {info.id} failed: {reason}", file=sys.stderr)
        return 1
    print(f"fedbus node {info.id}: the run finished", flush=True)
    return 0


def run_role(
    args: argparse.Namespace, topology: Topology, info: NodeInfo, config: BrokerConfig
) -> int:
    """Run one hierarchical or gossip node as an agent; exit codes as ``fedbus node``."""
    with contextlib.suppress(KeyboardInterrupt):
        try:
            return asyncio.run(_run(args, topology, info, config))
        except ConfigError as exc:
            print(f"fedbus node {info.id}: {exc}", file=sys.stderr)
            return 2
    print(f"fedbus node {info.id}: interrupted", file=sys.stderr)
    return 130

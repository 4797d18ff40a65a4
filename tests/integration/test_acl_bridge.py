"""A generated edge broker bridged to the generated cloud broker, run for real.

The edge's upward traffic crosses, the parent's broadcasts come down, and
its devices' traffic stays on the edge broker (checked with sentinels: the
bridge is one connection, so order is kept).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from acl_support import GeneratedBroker, Node, host_paths, wait_for

from fedbus.broker import find_mosquitto
from fedbus.broker.mosquitto import hash_password
from fedbus.deploy import generate, plan_deployment, render_bridge_conf
from fedbus.topology import load_topology

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]

TOPOLOGY = """
name: hier
seed: 0
data: {dataset: digits, partition: {kind: iid}}
model: {kind: logreg}
protocol: {kind: hierarchical, rounds: 2, edge_rounds: 1}
nodes:
  server: {id: cloud}
  edges:
    - {id: edge-a, clients: 2}
"""


def test_edge_bridge_carries_only_the_edges_upward_traffic(tmp_path: Path) -> None:
    src = tmp_path / "topo.yaml"
    src.write_text(TOPOLOGY, encoding="utf-8")
    root = tmp_path / "deploy"
    generate(src, root)
    plan = plan_deployment(load_topology(src))
    pw = {p.name: p.read_text() for p in (root / "secrets/passwords").iterdir()}
    work = tmp_path / "run"
    work.mkdir()
    # The cloud broker with a test-only observer of everything under fedbus/.
    acl = (root / "brokers/mosquitto/acl").read_text()
    (work / "mosquitto.acl").write_text(acl + "\nuser observer\ntopic read fedbus/#\n")
    passwd = (root / "brokers/mosquitto/passwd").read_text()
    (work / "passwd").write_text(passwd + f"observer:{hash_password('obs')}\n")
    cloud_paths = dataclasses.replace(
        host_paths(root, "mosquitto", work), password_file=str(work / "passwd")
    )
    edge_paths = dataclasses.replace(
        host_paths(root, "mosquitto-edge-a", work),
        acl_file=str(root / "brokers/mosquitto-edge-a/acl"),
    )
    # The generated bridge text, but addressed to the test's cloud port.
    bridge_password = next(
        line.split()[1]
        for line in (root / "secrets/bridges/mosquitto-edge-a/bridge.conf").read_text().splitlines()
        if line.startswith("remote_password ")
    )
    with GeneratedBroker(plan.broker("mosquitto"), cloud_paths, work, tls=False) as cloud:
        Path(edge_paths.bridge_dir).mkdir()
        Path(edge_paths.bridge_dir, "bridge.conf").write_text(
            render_bridge_conf(
                plan, plan.broker("mosquitto-edge-a"), password=bridge_password, tls=False,
                address=f"127.0.0.1:{cloud.port}",
            )
        )  # fmt: skip
        with GeneratedBroker(plan.broker("mosquitto-edge-a"), edge_paths, work, tls=False) as edge:
            assert wait_for(lambda: "u'edge-a'" in cloud.log_text()), cloud.log_text()
            observer = Node(cloud.port, "observer", "obs")
            server = Node(cloud.port, "cloud", pw["cloud"])
            edge_node = Node(edge.port, "edge-a", pw["edge-a"])
            device = Node(edge.port, "edge-a-client-0", pw["edge-a-client-0"])
            nodes = [observer, server, edge_node, device]
            try:
                assert all(n.connect() for n in nodes)
                assert observer.subscribe("fedbus/#")
                assert edge_node.subscribe("fedbus/hier/out/cloud/#")
                assert edge_node.subscribe("fedbus/hier/to/edge-a/+")
                # Wait until the bridge's own subscriptions on the cloud are in place.
                assert wait_for(lambda: _through(server, edge_node, b"ping")), edge.log_text()
                device.publish("fedbus/hier.edge-a/to/edge-a/edge-a-client-0", b"local-update")
                device.publish("fedbus/hier.edge-a/out/edge-a-client-0/leave", b"local-leave")
                edge_node.publish("fedbus/hier/to/cloud/edge-a", b"edge-update")
                edge_node.publish("fedbus/hier/out/edge-a/leave", b"edge-leave")
                server.publish("fedbus/hier/to/edge-a/cloud", b"ack-down")
                assert wait_for(
                    lambda: observer.got(b"edge-update") and observer.got(b"edge-leave")
                )
                assert wait_for(lambda: edge_node.got(b"ack-down"))
                assert not observer.got(b"local-update")
                assert not observer.got(b"local-leave")
            finally:
                for node in nodes:
                    node.close()


def _through(server: Node, edge_node: Node, payload: bytes) -> bool:
    server.publish("fedbus/hier/out/cloud/model", payload)
    return wait_for(lambda: edge_node.got(payload), timeout_s=0.5)

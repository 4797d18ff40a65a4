"""A hierarchical deployment's generated brokers run for real, checked with real clients.

The layout is the runtime's (`fedbus.deploy.plan`): an edge with a broker
of its own serves its namespace there and logs in to its parent's broker as
a member, both at once under one identity and one password; its devices may
watch its will in the parent namespace on the edge's broker and log in, in
advance of re-homing, to exactly the brokers of their fallbacks
(``protocol.rehome``). Each case is an allow or a deny; as in
test_acl_matrix, a publish counts as allowed only when a test-only observer
(appended to a copy of the generated ACL) receives it, and denials are
decided by an allowed sentinel from the same publisher arriving after them
(mosquitto keeps one publisher's QoS 1 order), not by timed waits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from acl_support import GeneratedBroker, Node, host_paths, wait_for

from fedbus.broker import find_mosquitto
from fedbus.broker.mosquitto import hash_password
from fedbus.deploy import DeploymentPlan, generate, plan_deployment
from fedbus.topology import load_topology

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(90),
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]

TOPOLOGY = """
name: hier
seed: 0
data: {dataset: digits, partition: {kind: iid}}
model: {kind: logreg}
training: {epochs: 1, batch_size: 32, lr: 0.1}
protocol: {kind: hierarchical, rounds: 2, edge_rounds: 1, rehome: REHOME,
           round_timeout_s: 20, join_timeout_s: 30}
nodes:
  server: {id: cloud}
  edges:
    - {id: edge-a, clients: 2}
    - {id: edge-b, clients: 1}
"""
UP = "fedbus/hier"
A = "fedbus/hier.edge-a"
B = "fedbus/hier.edge-b"
DEV = "edge-a-client-0"


def _deploy(tmp_path: Path, rehome: str) -> tuple[Path, DeploymentPlan, dict[str, str], Path]:
    src = tmp_path / "topo.yaml"
    src.write_text(TOPOLOGY.replace("REHOME", rehome), encoding="utf-8")
    root = tmp_path / "deploy"
    generate(src, root)
    plan = plan_deployment(load_topology(src))
    pw = {p.name: p.read_text() for p in (root / "secrets/passwords").iterdir()}
    work = tmp_path / "run"
    work.mkdir()
    return root, plan, pw, work


@contextlib.contextmanager
def _broker(
    root: Path, plan: DeploymentPlan, service: str, work: Path, *, observer: bool = True
) -> Iterator[GeneratedBroker]:
    """The generated config of ``service``; with ``observer`` a test-only reader of fedbus/#."""
    paths = host_paths(root, service, work)
    acl = (root / "brokers" / service / "acl").read_text()
    if observer:
        acl += (
            "\n# test only\nuser observer\ntopic read fedbus/#\nuser prober\ntopic write fedbus/#\n"
        )
        passwd = (root / "brokers" / service / "passwd").read_text()
        passwd += f"observer:{hash_password('obs')}\nprober:{hash_password('probe')}\n"
        (work / f"{service}.passwd").write_text(passwd)
        (work / f"{service}.passwd").chmod(0o600)
        paths = dataclasses.replace(paths, password_file=str(work / f"{service}.passwd"))
    Path(paths.acl_file).write_text(acl)
    with GeneratedBroker(plan.broker(service), paths, work, tls=False) as broker:
        yield broker


class Cases:
    """Allow/deny verdicts: (broker, actor, action, topic, expected, observed)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, bool, bool]] = []

    def add(self, where: str, who: str, action: str, topic: str, want: bool, got: bool) -> None:
        self.rows.append((where, who, action, topic, want, got))

    def wrong(self) -> list[tuple[str, str, str, str, bool, bool]]:
        return [row for row in self.rows if row[4] != row[5]]


def _publishes(
    cases: Cases, where: str, observer: Node, node: Node, topics: dict[str, bool], sentinel: str
) -> None:
    """Publish each topic (a unique payload), then an allowed sentinel; record what arrived."""
    for i, topic in enumerate(topics):
        node.publish(topic, f"{node.user}-{where}-{i}".encode())
    node.publish(sentinel, f"{node.user}-{where}-sentinel".encode())
    assert wait_for(lambda: observer.got(f"{node.user}-{where}-sentinel".encode()))
    for i, (topic, want) in enumerate(topics.items()):
        cases.add(
            where, node.user, "pub", topic, want, observer.got(f"{node.user}-{where}-{i}".encode())
        )


def _subscribes(
    cases: Cases, where: str, prober: Node, node: Node, filters: dict[str, bool]
) -> None:
    """Subscribe to each filter, then have the prober publish a probe matching each one.

    mosquitto grants every SUBACK and applies read rules per delivered
    message, so a filter counts as allowed only when its probe (wildcards
    filled in) arrives; the last probe goes to an allowed filter and, once
    it is in, the others have had their chance.
    """
    probes = {f: "/".join("x" if p == "+" else "probe" if p == "#" else p for p in f.split("/"))
              for f in filters}  # fmt: skip
    for topic_filter in filters:
        assert node.subscribe(topic_filter)
    sentinel = next(f for f, want in filters.items() if want)
    order = [f for f in filters if f != sentinel] + [sentinel]
    for i, topic_filter in enumerate(order):
        prober.publish(probes[topic_filter], f"probe-{node.user}-{where}-{i}".encode())
    assert wait_for(lambda: node.got(f"probe-{node.user}-{where}-{len(order) - 1}".encode()))
    for i, topic_filter in enumerate(order):
        got = node.got(f"probe-{node.user}-{where}-{i}".encode())
        cases.add(where, node.user, "sub", topic_filter, filters[topic_filter], got)
    for topic_filter in filters:
        node.client.unsubscribe(topic_filter)


def _login(cases: Cases, where: str, port: int, user: str, password: str, want: bool) -> None:
    node = Node(port, user, password)
    try:
        cases.add(where, user, "login", "-", want, node.connect())
    finally:
        node.close()


@pytest.mark.parametrize("rehome", ["parent", "sibling"])
def test_edge_on_both_brokers_and_devices_rehome_as_configured(tmp_path: Path, rehome: str) -> None:
    root, plan, pw, work = _deploy(tmp_path, rehome)
    cases = Cases()
    with (
        _broker(root, plan, "mosquitto", work) as cloud_b,
        _broker(root, plan, "mosquitto-edge-a", work) as edge_b,
        _broker(root, plan, "mosquitto-edge-b", work) as sib_b,
    ):
        brokers = {"cloud": cloud_b.port, "edge-a": edge_b.port, "edge-b": sib_b.port}
        observers = {k: Node(port, "observer", "obs") for k, port in brokers.items()}
        probers = {k: Node(port, "prober", "probe") for k, port in brokers.items()}
        # The edge's two connections, both as edge-a with its one password, held at once.
        edge_down = Node(edge_b.port, "edge-a", pw["edge-a"])
        edge_up = Node(cloud_b.port, "edge-a", pw["edge-a"])
        device = Node(edge_b.port, DEV, pw[DEV])
        nodes = [*observers.values(), *probers.values(), edge_down, edge_up, device]
        try:
            assert all(n.connect() for n in nodes)
            for obs in observers.values():
                assert obs.subscribe("fedbus/#")
            # On its own broker the edge is the server of hier.edge-a.
            _subscribes(cases, "edge-a", probers["edge-a"], edge_down, {
                f"{A}/to/edge-a/+": True, f"{A}/out/+/leave": True,
                f"{UP}/to/edge-a/+": False, f"{UP}/out/cloud/#": False, f"{A}/to/{DEV}/+": False,
            })  # fmt: skip
            _publishes(cases, "edge-a", observers["edge-a"], edge_down, {
                f"{A}/out/edge-a/manifest": True, f"{A}/to/{DEV}/edge-a": True,
                f"{UP}/to/cloud/edge-a": False, f"{UP}/out/edge-a/leave": False,
                f"{A}/out/{DEV}/leave": False,
            }, sentinel=f"{A}/out/edge-a/model")  # fmt: skip
            # On the cloud broker it is a member of hier, like a client.
            _subscribes(cases, "cloud", probers["cloud"], edge_up, {
                f"{UP}/out/cloud/#": True, f"{UP}/to/edge-a/+": True,
                f"{UP}/out/+/leave": False, f"{UP}/to/edge-b/+": False, f"{UP}/out/edge-b/#": False,
            })  # fmt: skip
            _publishes(cases, "cloud", observers["cloud"], edge_up, {
                f"{UP}/to/cloud/edge-a": True, f"{UP}/out/edge-a/leave": True,
                f"{UP}/to/edge-b/edge-a": False, f"{UP}/out/cloud/model": False,
                f"{A}/out/edge-a/model": False,
            }, sentinel=f"{UP}/out/edge-a/join")  # fmt: skip
            # Neither connection took the other over.
            assert not edge_down.disconnected.is_set()
            assert not edge_up.disconnected.is_set()
            # A device at home: its edge's broadcasts, and its edge's will where it watches it.
            _subscribes(cases, "edge-a", probers["edge-a"], device, {
                f"{A}/out/edge-a/#": True, f"{A}/to/{DEV}/+": True, f"{UP}/out/edge-a/leave": True,
                f"{UP}/out/cloud/#": False, f"{UP}/out/edge-b/leave": False,
                f"{A}/to/edge-a-client-1/+": False, f"{A}/out/+/leave": False,
            })  # fmt: skip
            _publishes(cases, "edge-a", observers["edge-a"], device, {
                f"{A}/to/edge-a/{DEV}": True, f"{A}/to/edge-a/edge-a-client-1": False,
                f"{A}/out/edge-a/model": False, f"{UP}/to/cloud/{DEV}": False,
            }, sentinel=f"{A}/out/{DEV}/leave")  # fmt: skip
        finally:
            for node in nodes:
                node.close()
        # Re-homing: to the cloud in both modes (the chain ends at the grandparent), to
        # the sibling edge-b only with rehome: sibling.
        sibling = rehome == "sibling"
        for where, ns, agg, allowed in (
            ("cloud", UP, "cloud", True),
            ("edge-b", B, "edge-b", sibling),
        ):
            _login(cases, where, brokers[where], DEV, pw[DEV], allowed)
            if not allowed:
                continue
            moved, obs = Node(brokers[where], DEV, pw[DEV]), _observer(brokers[where])
            prober = Node(brokers[where], "prober", "probe")
            try:
                assert moved.connect()
                assert prober.connect()
                watch = {f"{UP}/out/edge-b/leave": where == "edge-b"}
                _subscribes(cases, where, prober, moved, {
                    f"{ns}/out/{agg}/#": True, f"{ns}/to/{DEV}/+": True, **watch,
                    f"{ns}/out/+/leave": False, f"{A}/out/edge-a/#": False,
                })  # fmt: skip
                _publishes(cases, where, obs, moved, {
                    f"{ns}/to/{agg}/{DEV}": True, f"{ns}/to/{agg}/edge-a-client-1": False,
                    f"{ns}/out/{agg}/model": False,
                }, sentinel=f"{ns}/out/{DEV}/leave")  # fmt: skip
            finally:
                moved.close()
                obs.close()
                prober.close()
        # Credentials: nobody logs in where the runtime never sends it.
        _login(cases, "edge-a", brokers["edge-a"], "cloud", pw["cloud"], False)
        _login(cases, "edge-a", brokers["edge-a"], "edge-b", pw["edge-b"], False)
        _login(cases, "edge-b", brokers["edge-b"], "edge-a", pw["edge-a"], False)
        _login(cases, "cloud", brokers["cloud"], "edge-a", pw[DEV], False)  # wrong password
        # edge-b's device never re-homes to edge-a (edge-a is not after edge-b in its chain
        # with rehome: parent; with sibling it wraps around to edge-a).
        _login(
            cases, "edge-a", brokers["edge-a"], "edge-b-client-0", pw["edge-b-client-0"], sibling
        )
        for broker in (cloud_b, edge_b, sib_b):
            assert "Warning: ACL" not in broker.log_text(), broker.log_text()
    allowed = sum(1 for row in cases.rows if row[4])
    print(f"hierarchy ACL cases (rehome: {rehome}): {len(cases.rows)}, {allowed} allow")
    assert not cases.wrong(), "\n".join(map(str, cases.wrong()))


def _observer(port: int) -> Node:
    """A connected test-only observer of everything under fedbus/."""
    obs = Node(port, "observer", "obs")
    assert obs.connect()
    assert obs.subscribe("fedbus/#")
    return obs


def test_a_hierarchical_federation_runs_through_the_generated_brokers(tmp_path: Path) -> None:
    """`fedbus run` (edges on their own brokers) against the generated, credentialed brokers.

    The deployment topology is used as written except for host ports: the
    edges' ``broker`` URLs name compose services, so they are pointed at the
    test's brokers; passwords come per node from the secrets directory.
    """
    root, plan, _pw, work = _deploy(tmp_path, "parent")
    out, log = tmp_path / "results", tmp_path / "run.log"
    env = {**os.environ, "FEDBUS_PASSWORD_FILE": str(root / "secrets/passwords")}
    env.pop("FEDBUS_PASSWORD", None)
    with (
        _broker(root, plan, "mosquitto", work, observer=False) as cloud_b,
        _broker(root, plan, "mosquitto-edge-a", work, observer=False) as edge_a,
        _broker(root, plan, "mosquitto-edge-b", work, observer=False) as edge_b,
    ):
        text = (root / "topology.yaml").read_text()
        for service, broker in (("mosquitto-edge-a", edge_a), ("mosquitto-edge-b", edge_b)):
            text = text.replace(f"mqtt://{service}:1883", f"mqtt://127.0.0.1:{broker.port}")
        (root / "topology.host.yaml").write_text(text)
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedbus", "run", str(root / "topology.host.yaml"),
                 "--broker", f"mqtt://127.0.0.1:{cloud_b.port}", "--out", str(out)],
                stdout=fh, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        try:
            rc = proc.wait(timeout=70)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
        logs = {b: b.log_text() for b in (cloud_b, edge_a, edge_b)}
    assert rc == 0, log.read_text() + "\n".join(logs.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["success"]
    # Each edge logged in to its own broker and to the cloud's, as itself.
    for node in ("cloud", "edge-a", "edge-b"):
        assert f"u'{node}'" in logs[cloud_b]
    assert "u'edge-a-client-0'" in logs[edge_a]
    assert "u'edge-a'" in logs[edge_a]
    for text in logs.values():
        assert "not authorised" not in text.lower()

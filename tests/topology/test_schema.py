"""YAML -> Topology: every key valid and invalid, paths, lines, defaults."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from fedbus.topology import (
    CrashFault,
    NodeRole,
    TopologyError,
    apply_overrides,
    load_topology,
    loads_topology,
)

DATA = Path(__file__).parent / "data"

BASE = {
    "name": "t",
    "data": {"dataset": "digits"},
    "protocol": {"kind": "centralized", "rounds": 3},
    "nodes": {"clients": {"count": 4}},
}


def with_(path: str, value: object) -> str:
    """BASE with ``a.b.c`` set to value, as YAML text."""
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    *parents, last = path.split(".")
    here = doc
    for key in parents:
        here = here.setdefault(key, {})
    here[last] = value
    return yaml.safe_dump(doc, sort_keys=False)


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(TopologyError) as info:
        loads_topology(text)
    return [(p.path, p.message) for p in info.value.problems]


def test_examples_load() -> None:
    for name in ("centralized", "hierarchical", "gossip"):
        load_topology(DATA / f"{name}.yaml")


def test_defaults() -> None:
    t = loads_topology(yaml.safe_dump(BASE))
    assert t.seed == 0
    assert t.broker.kind == "embedded"
    assert t.broker.max_payload_bytes == 1_000_000
    assert t.data is not None
    assert t.data.test_fraction == 0.2
    assert t.data.partition.kind == "iid"
    assert t.protocol.round_timeout_s == 30.0
    assert t.protocol.join_timeout_s == 60.0
    assert t.protocol.evaluate == "central"
    assert t.protocol.aggregator.kind == "fedavg"
    assert t.nodes.server == "server"
    assert t.nodes.clients == ("client-0", "client-1", "client-2", "client-3")
    assert t.model.kind == "mlp"
    assert t.training.batch_size == 16


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    doc = dict(BASE)
    del doc["name"]
    path = tmp_path / "my-run.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert load_topology(path).name == "my-run"


def test_evaluate_default_federated_without_data() -> None:
    text = "nodes: {clients: 3, external: [client-0, client-1, client-2]}"
    assert loads_topology(text).protocol.evaluate == "federated"
    assert loads_topology(text).data is None


def test_synthetic_defaults_to_natural_partition() -> None:
    t = loads_topology(with_("data", {"dataset": "synthetic"}))
    assert t.data is not None
    assert t.data.partition.kind == "natural"
    assert t.data.synthetic is not None
    assert t.data.synthetic.alpha == 1.0


VALID = [
    ("seed", 7),
    ("broker", "memory"),
    ("broker", "mqtt://localhost:1883"),
    (
        "broker",
        {"url": "mqtts://h:8883", "username": "u", "password_env": "P", "ca_file": "ca.pem"},
    ),
    (
        "broker",
        {"url": "mqtts://h", "cert_file": "c.pem", "key_file": "k.pem", "max_payload_bytes": 4096},
    ),
    ("broker", {"url": "embedded", "max_payload_bytes": 131072}),
    (
        "data",
        {"dataset": "synthetic", "synthetic": {"alpha": 0, "beta": 0, "samples_per_client": 20}},
    ),
    ("data", {"dataset": "npz", "npz": {"path": "x.npz"}}),
    ("data", {"dataset": "npz", "npz": "x.npz"}),
    ("data.partition", {"kind": "dirichlet", "alpha": 0.1}),
    ("data.partition", {"kind": "shards", "shards_per_client": 3}),
    ("data.partition", "iid"),
    ("data.test_fraction", 0.5),
    ("model", {"kind": "logreg"}),
    ("model", {"kind": "cnn"}),
    ("model", {"kind": "mlp", "hidden": [64, 32]}),
    ("model", {"factory": "pkg.mod:make"}),
    ("training", {"epochs": 5, "batch_size": 10, "lr": 0.01, "mu": 1.0}),
    ("protocol.clients_per_round", 2),
    ("protocol.fraction", 0.5),
    ("protocol.min_clients", 4),
    ("protocol.round_timeout_s", 5),
    ("protocol.join_timeout_s", 1.5),
    ("protocol.evaluate", "federated"),
    ("protocol.aggregator", "median"),
    ("protocol.aggregator", {"kind": "fedavgm", "beta": 0.9}),
    ("protocol.aggregator", {"factory": "my.aggs:build", "f": 1}),
    ("nodes.clients", [{"id": "a"}, {"id": "b"}]),
    ("nodes.clients", 3),
    ("nodes.server", {"id": "cloud-1"}),
    ("nodes.external", ["client-1"]),
    ("faults", [{"kind": "crash", "nodes": ["client-1"], "at_round": 3}]),
    ("faults", [{"kind": "dropout", "probability": 1}]),
    ("faults", [{"kind": "straggler", "probability": 0.1, "delay_s": 2}]),
    ("faults", [{"kind": "churn", "probability": 0.1, "down_rounds": 2}]),
]


@pytest.mark.parametrize(("path", "value"), VALID)
def test_valid_keys(path: str, value: object) -> None:
    loads_topology(with_(path, value))


INVALID = [
    ("name", "has space", "name"),
    ("seed", -1, "seed"),
    ("seed", "x", "seed"),
    ("broker", "http://x", "broker"),
    ("broker", {"url": "mqtt://h", "cert_file": "c.pem"}, "broker.cert_file"),
    ("broker", {"url": "mqtt://h", "max_payload_bytes": 10}, "broker.max_payload_bytes"),
    ("broker", {"url": "memory", "username": "u"}, "broker.username"),
    ("broker", {"ur": "mqtt://h"}, "broker.ur"),
    ("broker", 5, "broker"),
    ("data.dataset", "mnist", "data.dataset"),
    ("data", {"dataset": "npz"}, "data.npz"),
    ("data", {"dataset": "digits", "synthetic": {"alpha": 1}}, "data.synthetic"),
    ("data", {"dataset": "synthetic", "synthetic": {"alpha": -1}}, "data.synthetic.alpha"),
    (
        "data",
        {"dataset": "synthetic", "synthetic": {"samples_per_client": 0}},
        "data.synthetic.samples_per_client",
    ),
    ("data.partition", {"kind": "dirichlet", "alpha": 0}, "data.partition.alpha"),
    ("data.partition", {"kind": "iid", "alpha": 1}, "data.partition.alpha"),
    ("data.partition", {"kind": "natural"}, "data.partition.kind"),
    (
        "data.partition",
        {"kind": "shards", "shards_per_client": 0},
        "data.partition.shards_per_client",
    ),
    ("data.test_fraction", 1.0, "data.test_fraction"),
    ("data.test_fraction", 0, "data.test_fraction"),
    ("model", {"kind": "transformer"}, "model.kind"),
    ("model", {"kind": "logreg", "hidden": [3]}, "model.hidden"),
    ("model", {"kind": "mlp", "hidden": [0]}, "model.hidden[0]"),
    ("model", {"kind": "mlp", "hidden": ["a"]}, "model.hidden"),
    ("model", {"factory": "not a factory"}, "model.factory"),
    ("model", {"kind": "mlp", "factory": "a:b"}, "model"),
    ("training.epochs", 0, "training.epochs"),
    ("training.batch_size", 1.5, "training.batch_size"),
    ("training.lr", 0, "training.lr"),
    ("training.mu", -0.1, "training.mu"),
    ("protocol.kind", "ring", "protocol.kind"),
    ("protocol.rounds", 0, "protocol.rounds"),
    ("protocol.rounds", True, "protocol.rounds"),
    ("protocol.clients_per_round", 5, "protocol.clients_per_round"),
    ("protocol.clients_per_round", 0, "protocol.clients_per_round"),
    ("protocol.fraction", 0, "protocol.fraction"),
    ("protocol.min_clients", 5, "protocol.min_clients"),
    ("protocol.min_clients", 0, "protocol.min_clients"),
    ("protocol.round_timeout_s", -1, "protocol.round_timeout_s"),
    ("protocol.join_timeout_s", 0, "protocol.join_timeout_s"),
    ("protocol.evaluate", "local", "protocol.evaluate"),
    ("protocol.aggregator", "fed-avg", "protocol.aggregator.kind"),
    ("protocol.aggregator", {"factory": "nocolon"}, "protocol.aggregator.factory"),
    ("protocol.aggregator", {"beta": 1}, "protocol.aggregator"),
    ("protocol.aggregator", [1], "protocol.aggregator"),
    ("protocol.edge_rounds", 2, "protocol.edge_rounds"),
    ("protocol.rehome", "sibling", "protocol.rehome"),
    ("protocol.mixing", "push_sum", "protocol.mixing"),
    ("protocol.lr_decay", 0.9, "protocol.lr_decay"),
    ("protocol.final_mixing_rounds", 5, "protocol.final_mixing_rounds"),
    ("nodes.clients", 0, "nodes.clients"),
    ("nodes.clients", {"cnt": 3}, "nodes.clients.cnt"),
    ("nodes.clients", [{"id": "a/b"}], "nodes.clients[0]"),
    ("nodes.clients", [{"id": "a"}, {"id": "a"}], "nodes.clients[1]"),
    ("nodes.clients", [{"id": "server"}], "nodes.clients[0]"),
    ("nodes.server", {"id": "$SYS"}, "nodes.server.id"),
    ("nodes.external", ["client-9"], "nodes.external[0]"),
    ("nodes.peers", 3, "nodes.peers"),
    ("nodes.edges", [{"id": "e", "clients": 2}], "nodes.edges"),
    ("faults", [{"kind": "crash", "nodes": ["nobody"]}], "faults[0].nodes[0]"),
    ("faults", [{"kind": "crash", "nodes": ["client-1"], "at_round": 9}], "faults[0].at_round"),
    ("faults", [{"kind": "crash", "nodes": []}], "faults[0].nodes"),
    ("faults", [{"kind": "dropout", "probability": 1.5}], "faults[0].probability"),
    ("faults", [{"kind": "dropout"}], "faults[0]"),
    ("faults", [{"kind": "straggler", "probability": 0.1, "delay_s": 0}], "faults[0].delay_s"),
    ("faults", [{"kind": "churn", "probability": 0.1, "down_rounds": 0}], "faults[0].down_rounds"),
    ("faults", [{"kind": "meteor"}], "faults[0].kind"),
    ("faults", [{"kind": "dropout", "probability": 0.1, "nodes": ["x"]}], "faults[0].nodes"),
    ("faults", {"kind": "dropout"}, "faults"),
]


@pytest.mark.parametrize(("path", "value", "where"), INVALID)
def test_invalid_keys(path: str, value: object, where: str) -> None:
    found = problems(with_(path, value))
    assert where in [p for p, _ in found], found


def test_unknown_key_suggestion_path_and_line() -> None:
    text = textwrap.dedent(
        """\
        name: t
        data: {dataset: digits}
        protocol:
          kind: centralized
          roundz: 3
        nodes:
          clients: {count: 2}
          sever: {id: s}
        """
    )
    with pytest.raises(TopologyError) as info:
        loads_topology(text, filename="f.yaml")
    got = [(p.path, p.line, p.message) for p in info.value.problems]
    assert ("protocol.roundz", 5, "unknown key 'roundz'; did you mean 'rounds'?") in got
    assert ("nodes.sever", 8, "unknown key 'sever'; did you mean 'server'?") in got
    assert "f.yaml:5: protocol.roundz: unknown key" in info.value.format()


def test_many_problems_collected_with_lines() -> None:
    text = (DATA / "invalid.yaml").read_text()
    with pytest.raises(TopologyError) as info:
        loads_topology(text)
    got = {(p.path, p.line) for p in info.value.problems}
    assert {
        ("protocol.roundz", 4),
        ("protocol.rounds", 5),
        ("protocol.fraction", 6),
        ("training.lr", 8),
        ("faults[0].nodes[0]", 12),
    } <= got


def test_nested_edge_problem_path_and_line() -> None:
    text = textwrap.dedent(
        """\
        name: h
        data: {dataset: digits}
        protocol: {kind: hierarchical, rounds: 2}
        nodes:
          server: {id: cloud}
          edges:
            - {id: a, clients: 2}
            - id: b
              edges:
                - {id: b1, clients: 0}
                - {id: b2, clients: 2, min_clients: 3}
        """
    )
    with pytest.raises(TopologyError) as info:
        loads_topology(text)
    got = {(p.path, p.line) for p in info.value.problems}
    assert ("nodes.edges[1].edges[0].clients", 10) in got
    assert ("nodes.edges[1].edges[1].min_clients", 11) in got


def test_duplicate_key_and_syntax_error() -> None:
    got = problems("name: a\nname: b\nnodes: {clients: 1}\ndata: {}\n")
    assert got[0] == ("name", "duplicate key 'name' (first at line 1)")
    with pytest.raises(TopologyError) as info:
        loads_topology("name: [unclosed\nnodes: 1\n")
    assert info.value.problems[0].line is not None
    assert "syntax" in info.value.problems[0].message


def test_unquoted_exponent_is_a_number() -> None:
    t = loads_topology(with_("training", {}).replace("training: {}", "training: {lr: 1e-3}"))
    assert t.training.lr == 0.001


def test_hierarchical_effective_settings() -> None:
    t = load_topology(DATA / "hierarchical.yaml")
    assert t.ids(NodeRole.EDGE) == ("edge-a", "region-b", "edge-b1", "edge-b2")
    assert "edge-b2-client-3" in t.ids(NodeRole.CLIENT)
    cloud, b1, b2 = t.node("cloud"), t.node("edge-b1"), t.node("edge-b2")
    assert cloud.min_clients == 2
    assert cloud.children == ("edge-a", "region-b")
    assert b1.round_timeout_s == 45
    assert b1.aggregator is not None
    assert b1.aggregator.kind == "trimmed_mean"
    assert b1.aggregator.params == {"beta": 0.1}
    assert b1.aggregator.as_dict() == {"kind": "trimmed_mean", "beta": 0.1}
    assert b2.min_clients == 3
    assert b1.min_clients == 2
    assert t.node("edge-a").child_broker is not None
    assert t.node("edge-a-client-0").broker.url == "mqtt://edge-a.local:1883"
    assert t.node("edge-a").broker.kind == "embedded"
    assert t.node("edge-b1-client-0").parent == "edge-b1"
    assert t.node("edge-b1-client-0").depth == 3


def test_gossip_nodes() -> None:
    t = load_topology(DATA / "gossip.yaml")
    peers = [i for i in t.node_infos() if i.role is NodeRole.PEER]
    assert len(peers) == 16
    assert all(len(p.neighbours) == 3 for p in peers)
    assert t.nodes.server is None


def test_gossip_disconnected_rejected_unless_allowed() -> None:
    base = "name: g\ndata: {}\nprotocol: {kind: gossip}\nnodes:\n  peers: 4\n  graph: {kind: edges, edges: [[peer-0, peer-1], [peer-2, peer-3]]}\n"
    assert tuple(p for p, _ in problems(base))[:1] == ("nodes.graph",)
    loads_topology(base + "  allow_disconnected: true\n")
    got = problems(base.replace("peer-3]]", "peer-9]]"))
    assert got[0][0] == "nodes.graph.edges[1][1]"


def test_aggregator_hook() -> None:
    def check(spec: object) -> list[str]:
        return ["unknown aggregator 'median'"] if getattr(spec, "kind", None) == "median" else []

    with pytest.raises(TopologyError) as info:
        loads_topology(with_("protocol.aggregator", "median"), check_aggregator=check)
    assert info.value.problems[0].path == "protocol.aggregator"


def test_overrides() -> None:
    t = load_topology(DATA / "centralized.yaml")
    u = apply_overrides(t, rounds=5, seed=3, broker_url="mqtts://h:8883")
    assert (u.protocol.rounds, u.seed, u.broker.url) == (5, 3, "mqtts://h:8883")
    assert apply_overrides(t, broker_url="memory").broker.kind == "memory"
    with pytest.raises(TopologyError) as info:
        apply_overrides(t, rounds=1)  # the crash at round 2 never happens
    assert info.value.problems[0].path == "faults[0].at_round"
    assert isinstance(t.faults[0], CrashFault)


def test_override_keeps_credentials() -> None:
    t = loads_topology(
        with_("broker", {"url": "mqtt://a", "password_env": "PW", "max_payload_bytes": 4096})
    )
    u = apply_overrides(t, broker_url="mqtt://b:1884")
    assert u.broker.config is not None
    assert (u.broker.config.host, u.broker.config.password_env, u.broker.max_payload_bytes) == (
        "b",
        "PW",
        4096,
    )


def test_missing_file() -> None:
    with pytest.raises(TopologyError) as info:
        load_topology("/nonexistent/x.yaml")
    assert "cannot read" in info.value.problems[0].message


@pytest.mark.parametrize(
    ("broker", "lean"),
    [
        ("embedded", True),  # auto: the broker fedbus starts gets the lean client
        ("memory", False),
        ("mqtt://h", False),  # auto: a URL broker gets paho (MQTT 5)
        ({"url": "mqtt://h", "client": "lean"}, True),
        ({"url": "embedded", "client": "paho"}, False),
        ({"url": "embedded", "client": "auto"}, True),
    ],
)
def test_broker_client_choice(broker: object, lean: bool) -> None:
    assert loads_topology(with_("broker", broker)).broker.lean is lean


def test_broker_client_errors_and_overrides() -> None:
    assert problems(with_("broker", {"url": "mqtt://h", "client": "hbmqtt"})) == [
        ("broker.client", "must be one of auto, lean, paho; got 'hbmqtt'")
    ]
    t = loads_topology(with_("broker", {"url": "embedded", "client": "paho"}))
    for url in ("memory", "mqtt://b:1884"):
        assert apply_overrides(t, broker_url=url).broker.client == "paho"
    u = loads_topology(with_("broker", {"url": "mqtt://a", "client": "lean"}))
    assert apply_overrides(u, broker_url="mqtt://b").broker.lean

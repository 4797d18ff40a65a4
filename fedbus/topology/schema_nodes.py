"""Reading the ``nodes:`` and ``faults:`` sections of a topology (see `fedbus.topology.schema`)."""

from __future__ import annotations

from fedbus.topology.graphs import GraphConfig
from fedbus.topology.model import ChurnFault, CrashFault, DropoutFault, Fault, StragglerFault
from fedbus.topology.nodes import EdgeConfig, NodesConfig
from fedbus.topology.reader import Context, Section, type_name
from fedbus.topology.robustness import read_validators
from fedbus.topology.schema_common import read_aggregator, read_broker
from fedbus.topology.yamlpos import Located

__all__ = ["read_faults", "read_nodes"]

_NODES_KEYS = ("server", "clients", "edges", "peers", "graph", "allow_disconnected", "external")
_EDGE_KEYS = (
    "id", "clients", "edges", "broker", "round_timeout_s", "min_clients", "aggregator", "validators",
)  # fmt: skip
_GRAPH_KEYS = ("kind", "rows", "degree", "p", "k", "edges")
_FAULT_KEYS = {
    "crash": ("kind", "nodes", "at_round"),
    "dropout": ("kind", "probability"),
    "straggler": ("kind", "probability", "delay_s"),
    "churn": ("kind", "probability", "down_rounds"),
}
_MAX_COUNT = 100_000
"""A sanity bound on generated nodes: a typo'd count should not build a million ids."""


def read_nodes(ctx: Context, node: Located | None, *, seed: int) -> NodesConfig:
    """Read ``nodes:`` (server, clients, edges, peers, graph, external)."""
    if node is None:
        ctx.add("nodes", "missing: a topology needs nodes (clients, edges or peers)", degrade=True)
        return NodesConfig()
    sec = Section(ctx, node, "nodes", _NODES_KEYS)
    server = None
    raw_server = sec.node("server")
    if raw_server is not None and isinstance(raw_server.value, str):
        server = raw_server.value
    else:
        server_sec = Section(ctx, raw_server, "nodes.server", ("id",))
        default = "server" if not sec.has("peers") else None
        server = server_sec.text("id", default)
    edges = _read_edges(ctx, sec.node("edges"), "nodes.edges")
    peers = _read_ids(ctx, sec.node("peers"), "nodes.peers", "peer-")
    graph = (
        _read_graph(ctx, sec.node("graph"), "nodes.graph") if peers or sec.has("graph") else None
    )
    return ctx.build(
        "nodes",
        NodesConfig,
        server=server,
        clients=_read_ids(ctx, sec.node("clients"), "nodes.clients", "client-"),
        edges=edges,
        peers=peers,
        graph=graph,
        allow_disconnected=sec.flag("allow_disconnected", False),
        external=sec.str_list("external"),
        graph_seed=seed,
    )


def _read_ids(ctx: Context, node: Located | None, path: str, prefix: str) -> tuple[str, ...]:
    """``N``, ``{count: N}`` (ids ``<prefix><i>``) or a list of ``{id: ...}`` or plain ids."""
    if node is None or node.value is None:
        return ()
    count: int | None = None
    if node.is_mapping:
        count_sec = Section(ctx, node, path, ("count",))
        if not count_sec.has("count"):
            ctx.add(path, "needs count (or give a list of {id: ...})")
            return ()
        count = count_sec.integer("count", 0)
    elif isinstance(node.value, int) and not isinstance(node.value, bool):
        count = node.value
    elif node.is_sequence:
        ids: list[str] = []
        for i, item in enumerate(node.value):
            item_path = f"{path}[{i}]"
            if isinstance(item.value, str):
                ids.append(item.value)
                continue
            item_sec = Section(ctx, item, item_path, ("id",))
            if item.is_mapping and not item_sec.has("id"):
                ctx.add(item_path, "needs id")
            ident = item_sec.text("id", None)
            if ident is not None:
                ids.append(ident)
        return tuple(ids)
    else:
        ctx.add(
            path,
            f"must be a count, {{count: N}} or a list of {{id: ...}}, got {type_name(node.value)}",
        )
        return ()
    if not 1 <= count <= _MAX_COUNT:
        where = f"{path}.count" if node.is_mapping else path
        ctx.add(where, f"must be in 1..{_MAX_COUNT}, got {count}")
        return ()
    return tuple(f"{prefix}{i}" for i in range(count))


def _read_edges(ctx: Context, node: Located | None, path: str) -> tuple[EdgeConfig, ...]:
    if node is None or node.value is None:
        return ()
    if not node.is_sequence:
        ctx.add(path, f"must be a list of edges, got {type_name(node.value)}")
        return ()
    return tuple(_read_edge(ctx, item, f"{path}[{i}]") for i, item in enumerate(node.value))


def _read_edge(ctx: Context, node: Located, path: str) -> EdgeConfig:
    sec = Section(ctx, node, path, _EDGE_KEYS)
    if node.is_mapping and not sec.has("id"):
        ctx.add(path, "an edge needs an id")
    edge_id = sec.text("id", "?")
    clients = _read_ids(ctx, sec.node("clients"), sec.at("clients"), f"{edge_id}-client-")
    broker = (
        read_broker(ctx, sec.node("broker"), sec.at("broker"), top_level=False)
        if sec.has("broker")
        else None
    )
    # On a problem the edge is kept as read (unchecked, see Context.build), so
    # the node-wide checks (unique ids, external names) still see its devices.
    return ctx.build(
        path,
        EdgeConfig,
        id=edge_id,
        clients=clients,
        edges=_read_edges(ctx, sec.node("edges"), sec.at("edges")),
        broker=broker,
        round_timeout_s=sec.opt_number("round_timeout_s"),
        min_clients=sec.opt_integer("min_clients"),
        aggregator=read_aggregator(ctx, sec.node("aggregator"), sec.at("aggregator")),
        validators=(
            read_validators(ctx, sec.node("validators"), sec.at("validators"))
            if sec.has("validators")
            else None
        ),
    )


def _read_graph(ctx: Context, node: Located | None, path: str) -> GraphConfig:
    if node is not None and isinstance(node.value, str):
        return ctx.build(path, GraphConfig, fallback=GraphConfig(), kind=node.value)
    sec = Section(ctx, node, path, _GRAPH_KEYS)
    edges: tuple[tuple[str, str], ...] | None = None
    raw = sec.node("edges")
    if raw is not None:
        pairs: list[tuple[str, str]] = []
        items = raw.value if raw.is_sequence else None
        if items is None:
            ctx.add(sec.at("edges"), "must be a list of [peer, peer] pairs", line=raw.line)
        for i, item in enumerate(items or []):
            ends = [e.value for e in item.value] if item.is_sequence else None
            if ends is None or len(ends) != 2 or not all(isinstance(e, str) for e in ends):
                ctx.add(
                    f"{sec.at('edges')}[{i}]", "must be a pair [peer-a, peer-b]", line=item.line
                )
                continue
            pairs.append((ends[0], ends[1]))
        edges = tuple(pairs)
    return ctx.build(
        path,
        GraphConfig,
        fallback=GraphConfig(),
        kind=sec.text("kind", "ring"),
        rows=sec.opt_integer("rows"),
        degree=sec.opt_integer("degree"),
        p=sec.opt_number("p"),
        k=sec.opt_integer("k"),
        edges=edges,
    )


def read_faults(ctx: Context, node: Located | None) -> tuple[Fault, ...]:
    """Read ``faults:``, a list of ``{kind: crash|dropout|straggler|churn, ...}``."""
    if node is None or node.value is None:
        return ()
    if not node.is_sequence:
        ctx.add("faults", f"must be a list of {{kind: ...}}, got {type_name(node.value)}")
        return ()
    faults: list[Fault] = []
    for i, item in enumerate(node.value):
        path = f"faults[{i}]"
        kind = item.value.get("kind") if item.is_mapping else None
        kind_name = kind.value if kind is not None else None
        if kind_name not in _FAULT_KEYS:
            if not item.is_mapping:
                ctx.add(path, f"must be a mapping {{kind: ...}}, got {type_name(item.value)}")
            else:
                shown = "missing" if kind is None else repr(kind_name)
                ctx.add(f"{path}.kind", f"{shown}; must be one of {', '.join(_FAULT_KEYS)}")
            continue
        sec = Section(ctx, item, path, _FAULT_KEYS[kind_name])
        for key in _FAULT_KEYS[kind_name]:
            if not sec.has(key) and key not in ("kind", "at_round", "down_rounds"):
                ctx.add(path, f"{kind_name} fault needs {key}")
        fault: Fault | None
        if kind_name == "crash":
            fault = ctx.build(
                path,
                CrashFault,
                nodes=sec.str_list("nodes"),
                at_round=sec.integer("at_round", 1),
            )
        elif kind_name == "dropout":
            fault = ctx.build(path, DropoutFault, probability=sec.number("probability", 0.0))
        elif kind_name == "straggler":
            fault = ctx.build(
                path,
                StragglerFault,
                probability=sec.number("probability", 0.0),
                delay_s=sec.number("delay_s", 1.0),
            )
        else:
            fault = ctx.build(
                path,
                ChurnFault,
                probability=sec.number("probability", 0.0),
                down_rounds=sec.integer("down_rounds", 1),
            )
        if fault is not None:
            faults.append(fault)
    return tuple(faults)

"""Topology YAML -> `Topology`, with every problem's YAML path and line.

The entry points are `load_topology` (a file) and `loads_topology` (text).
Both read the whole document, collect every problem (unknown keys, types,
ranges, cross-section rules) and raise one `TopologyError`. Defaults that
depend on other keys are resolved here, so the config objects stay plain:

* ``protocol.evaluate``: ``central`` when the file has a ``data`` section (the
  server holds the test split), ``federated`` when it has none (nodes bring
  their own data through ``fedbus node --data``).
* ``data.partition``: ``natural`` for ``synthetic``, ``iid`` otherwise.
* ``name``: the file name without its extension.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fedbus.topology.model import (
    AggregatorSpec,
    DataConfig,
    ModelConfig,
    NpzConfig,
    PartitionConfig,
    SyntheticConfig,
    TrainingConfig,
)
from fedbus.topology.problems import Problem, TopologyError
from fedbus.topology.protocol import ProtocolConfig
from fedbus.topology.reader import Context, Section, type_name
from fedbus.topology.robustness import read_attacks, read_validators
from fedbus.topology.root import Topology
from fedbus.topology.schema_common import read_aggregator, read_broker
from fedbus.topology.schema_nodes import read_faults, read_nodes
from fedbus.topology.yamlpos import Located, parse_yaml

__all__ = ["AggregatorCheck", "load_topology", "loads_topology"]

AggregatorCheck = Callable[..., Iterable[str | tuple[str, str]]]
"""Hook for the aggregator registry: ``check(spec)`` yields a problem per mistake (unknown name,
bad params), as a message or as ``(path relative to the spec, message)``. A hook that also takes
``updates_per_round=N`` (N: the updates that level aggregates per round, None when unknown)
gets it, for bounds such as Bulyan's n >= 4f+3."""

_ROOT_KEYS = (
    "name", "seed", "broker", "data", "model", "training", "protocol", "nodes", "faults",
    "attacks",
)  # fmt: skip


def load_topology(
    path: str | os.PathLike[str], *, check_aggregator: AggregatorCheck | None = None
) -> Topology:
    """Read and validate a topology file.

    Args:
        path: the YAML file. ``name`` defaults to its stem; relative ``npz``
            paths are taken relative to its folder.
        check_aggregator: optional check of each aggregator spec (the
            aggregator registry's), run on every level that names one.

    Raises:
        TopologyError: the file is missing, unreadable or invalid; its
            ``problems`` list every problem with path and line.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TopologyError(
            [Problem(path="", message=f"cannot read: {reason}")], filename=str(path)
        ) from exc
    return loads_topology(
        text,
        filename=str(path),
        default_name=file.stem,
        base_dir=file.parent,
        check_aggregator=check_aggregator,
    )


def loads_topology(
    text: str,
    *,
    filename: str | None = None,
    default_name: str = "topology",
    base_dir: str | os.PathLike[str] | None = None,
    check_aggregator: AggregatorCheck | None = None,
) -> Topology:
    """Validate topology YAML given as text; see `load_topology`."""
    parsed = parse_yaml(text)
    ctx = Context(parsed)
    root = parsed.root
    if root is None and not parsed.problems:
        ctx.add("", "the file is empty; a topology needs at least nodes")
    if root is None:
        raise TopologyError(ctx.problems, filename=filename)
    if not root.is_mapping:
        ctx.add(
            "",
            f"the top level must be a mapping of keys, got {type_name(root.value)}",
            line=root.line,
        )
        raise TopologyError(ctx.problems, filename=filename)
    top = Section(ctx, root, "", _ROOT_KEYS)
    name = top.text("name", default_name)
    seed = top.integer("seed", 0)
    broker = read_broker(ctx, top.node("broker"), "broker", top_level=True)
    data = _read_data(ctx, top.node("data"), base_dir) if top.has("data") else None
    evaluate = "central" if data is not None else "federated"
    protocol = _read_protocol(ctx, top.node("protocol"), evaluate)
    nodes = read_nodes(ctx, top.node("nodes"), seed=seed)
    faults = read_faults(ctx, top.node("faults"))
    attacks = read_attacks(ctx, top.node("attacks"))
    if check_aggregator is not None:
        _check_aggregators(ctx, check_aggregator, protocol, nodes)
    model = _read_model(ctx, top.node("model"))
    training = _read_training(ctx, top.node("training"))
    if not ctx.degraded:
        # Checks across sections; skipped after a type error, where a default
        # stands in for the bad value and could cause problems that are not real.
        reported = {p.path for p in ctx.problems}
        try:
            topology = Topology(
                name=name,
                seed=seed,
                broker=broker,
                data=data,
                model=model,
                training=training,
                protocol=protocol,
                nodes=nodes,
                faults=faults,
                attacks=attacks,
            )
        except TopologyError as exc:
            for problem in exc.problems:
                if problem.path not in reported:
                    ctx.add(problem.path, problem.message)
        else:
            if not ctx.problems:
                return topology
    raise TopologyError(ctx.problems, filename=filename)


def _read_data(
    ctx: Context, node: Located | None, base_dir: str | os.PathLike[str] | None
) -> DataConfig:
    sec = Section(ctx, node, "data", ("dataset", "synthetic", "npz", "partition", "test_fraction"))
    dataset = sec.text("dataset", "digits")
    synthetic = None
    if sec.has("synthetic") or dataset == "synthetic":
        syn = Section(
            ctx, sec.node("synthetic"), "data.synthetic", ("alpha", "beta", "samples_per_client")
        )
        synthetic = ctx.build(
            syn.path,
            SyntheticConfig,
            alpha=syn.number("alpha", 1.0),
            beta=syn.number("beta", 1.0),
            samples_per_client=syn.opt_integer("samples_per_client"),
        )
    npz = None
    if sec.has("npz"):
        raw = sec.node("npz")
        if raw is not None and isinstance(raw.value, str):
            file = raw.value
        else:
            file = Section(ctx, raw, "data.npz", ("path",)).text("path", "")
        if file and base_dir is not None and not os.path.isabs(file):
            file = os.path.join(base_dir, file)
        npz = ctx.build("data.npz", NpzConfig, path=file)
    partition = _read_partition(ctx, sec, "natural" if dataset == "synthetic" else "iid")
    return ctx.build(
        "data",
        DataConfig,
        dataset=dataset,
        synthetic=synthetic,
        npz=npz,
        partition=partition,
        test_fraction=sec.number("test_fraction", 0.2),
    )


def _read_partition(ctx: Context, data: Section, default_kind: str) -> PartitionConfig:
    node = data.node("partition")
    path = data.at("partition")
    if node is not None and isinstance(node.value, str):
        return ctx.build(path, PartitionConfig, kind=node.value)
    sec = Section(ctx, node, path, ("kind", "alpha", "shards_per_client"))
    kind = sec.text("kind", default_kind)
    for key, owner in (("alpha", "dirichlet"), ("shards_per_client", "shards")):
        if sec.has(key) and kind != owner:
            ctx.add(sec.at(key), f"applies only to partition kind {owner!r}", degrade=False)
    return ctx.build(
        path,
        PartitionConfig,
        kind=kind,
        alpha=sec.number("alpha", 0.5),
        shards_per_client=sec.integer("shards_per_client", 2),
    )


def _read_model(ctx: Context, node: Located | None) -> ModelConfig:
    if node is not None and isinstance(node.value, str):
        return ctx.build("model", ModelConfig, kind=node.value)
    sec = Section(ctx, node, "model", ("kind", "hidden", "factory"))
    factory = sec.text("factory", None)
    kind = sec.text("kind", None if factory is not None else "mlp")
    hidden: tuple[int, ...] = (32,)
    raw = sec.node("hidden")
    if raw is not None:
        if kind != "mlp":
            ctx.add(sec.at("hidden"), "applies only to model kind 'mlp'", degrade=False)
        items = raw.value if raw.is_sequence else [raw]
        widths = [item.value for item in items]
        if all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
            hidden = tuple(widths)
        else:
            ctx.add(sec.at("hidden"), "must be a list of integers (layer widths)", line=raw.line)
    return ctx.build("model", ModelConfig, kind=kind, hidden=hidden, factory=factory)


def _read_training(ctx: Context, node: Located | None) -> TrainingConfig:
    sec = Section(ctx, node, "training", ("epochs", "batch_size", "lr", "mu"))
    return ctx.build(
        "training",
        TrainingConfig,
        epochs=sec.integer("epochs", 1),
        batch_size=sec.integer("batch_size", 16),
        lr=sec.number("lr", 0.05),
        mu=sec.number("mu", 0.0),
    )


_PROTOCOL_KEYS = (
    "kind", "rounds", "clients_per_round", "fraction", "min_clients", "round_timeout_s",
    "join_timeout_s", "evaluate", "aggregator", "edge_rounds", "rehome", "mixing", "validators",
    "lr_decay", "final_mixing_rounds", "mode", "buffer_size", "max_staleness", "server_lr",
    "staleness_exponent",
)  # fmt: skip


def _read_protocol(ctx: Context, node: Located | None, evaluate: str) -> ProtocolConfig:
    sec = Section(ctx, node, "protocol", _PROTOCOL_KEYS)
    aggregator = read_aggregator(ctx, sec.node("aggregator"), sec.at("aggregator"))
    return ctx.build(
        "protocol",
        ProtocolConfig,
        kind=sec.text("kind", "centralized"),
        rounds=sec.integer("rounds", 10),
        clients_per_round=sec.opt_integer("clients_per_round"),
        fraction=sec.opt_number("fraction"),
        min_clients=sec.integer("min_clients", 1),
        round_timeout_s=sec.number("round_timeout_s", 30.0),
        join_timeout_s=sec.number("join_timeout_s", 60.0),
        evaluate=sec.text("evaluate", evaluate),
        aggregator=aggregator or AggregatorSpec(),
        edge_rounds=sec.integer("edge_rounds", 1),
        rehome=sec.text("rehome", "parent"),
        mixing=sec.text("mixing", "metropolis"),
        lr_decay=sec.number("lr_decay", 1.0),
        final_mixing_rounds=sec.integer("final_mixing_rounds", 0),
        validators=read_validators(ctx, sec.node("validators"), sec.at("validators")),
        mode=sec.text("mode", "sync"),
        buffer_size=sec.opt_integer("buffer_size"),
        max_staleness=sec.integer("max_staleness", 10),
        server_lr=sec.number("server_lr", 1.0),
        staleness_exponent=sec.number("staleness_exponent", 0.5),
    )


def _check_aggregators(
    ctx: Context, check: AggregatorCheck, protocol: ProtocolConfig, nodes: object
) -> None:
    from fedbus.protocols.selection import selection_size
    from fedbus.topology.nodes import NodesConfig

    top_n: int | None = None
    specs: list[tuple[str, AggregatorSpec, int | None]] = []
    if isinstance(nodes, NodesConfig):
        if protocol.kind == "centralized" and nodes.clients:
            top_n = protocol.selected_per_round(len(nodes.clients))
        elif protocol.kind == "hierarchical" and nodes.edges:
            top_n = len(nodes.edges)
        elif protocol.kind == "gossip" and nodes.peers and nodes.graph is not None:
            with contextlib.suppress(ValueError):  # a bad graph is reported on its own
                top_n = 1 + min((len(v) for v in nodes.adjacency().values()), default=0)
    specs.append(("protocol.aggregator", protocol.aggregator, top_n))
    if isinstance(nodes, NodesConfig):
        for i, top in enumerate(nodes.edges):
            for rel, edge in top.walk(f"nodes.edges[{i}]"):
                if edge.aggregator is not None:
                    n = None
                    if edge.clients and not edge.edges:
                        n = selection_size(
                            len(edge.clients), clients_per_round=None, fraction=protocol.fraction
                        )
                    specs.append((f"{rel}.aggregator", edge.aggregator, n))
    extra = _accepts_updates(check)
    for path, spec, n in specs:
        kwargs: dict[str, Any] = {"updates_per_round": n} if extra else {}
        for found in check(spec, **kwargs):
            if isinstance(found, tuple):
                rel, message = found
                ctx.add(f"{path}.{rel}" if rel else path, message, degrade=False)
            else:
                ctx.add(path, found, degrade=False)


def _accepts_updates(check: AggregatorCheck) -> bool:
    """Whether the hook takes ``updates_per_round`` (older hooks take the spec only)."""
    import inspect

    try:
        params = inspect.signature(check).parameters
    except (TypeError, ValueError):
        return False
    return "updates_per_round" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )

"""From a `Topology` to what the nodes need: protocol config, data, trainers, faults, run id.

Everything here is deterministic in the topology and its seed, which is what
lets ``fedbus run`` and a ``fedbus node`` agent on another host build the
same partition for the same client, and the reference loop in
``benchmarks/reference_fedavg.py`` the same model.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from fedbus.errors import ConfigError
from fedbus.learning.partition import FederationData, build_federation_data, load_node_data
from fedbus.learning.trainer import Trainer
from fedbus.learning.trainers import make_trainer
from fedbus.nodes.faults import FaultPlan
from fedbus.protocols.fedavg import FedAvgConfig
from fedbus.protocols.fedbuff import FedBuffConfig
from fedbus.topology import (
    ChurnFault,
    CrashFault,
    DropoutFault,
    StragglerFault,
    SyntheticConfig,
    Topology,
)

__all__ = [
    "build_data",
    "client_trainer",
    "fault_plan",
    "fedbuff_config",
    "model_spec",
    "new_run_id",
    "protocol_config",
    "server_trainer",
    "unsupported_reason",
]


def unsupported_reason(topology: Topology) -> str | None:
    """Why ``fedbus run``/``fedbus node`` cannot run this topology yet (None: they can)."""
    if topology.data is None:
        return "a topology without a data section is not supported yet (the model needs its sizes)"
    return None


def new_run_id(name: str) -> str:
    """A fresh run id, ``<name>-<8 hex digits>``: unique per ``fedbus run``."""
    return f"{name}-{secrets.token_hex(4)}"


def _train_config(topology: Topology) -> dict[str, bool | int | float | str]:
    t = topology.training
    return {"epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr, "mu": t.mu}


def fedbuff_config(topology: Topology) -> FedBuffConfig:
    """The FedBuff machine's config (``protocol.mode: async``); ``rounds`` counts aggregations.

    ``buffer_size`` defaults to min(10, clients): FedBuff's K = 10, but never more
    updates than there are clients to send them at one version. ``round_timeout_s``
    is the aggregation deadline and ``min_clients`` the smallest buffer flushed at
    it (`fedbus.protocols.fedbuff`).
    """
    p = topology.protocol
    clients = max(len(topology.nodes.clients), 1)
    k = p.buffer_size if p.buffer_size is not None else min(10, clients)
    return FedBuffConfig(
        buffer_size=k,
        max_versions=p.rounds,
        max_staleness=p.max_staleness,
        server_lr=p.server_lr,
        staleness_exponent=p.staleness_exponent,
        min_clients=min(p.min_clients, k),
        round_timeout_s=p.round_timeout_s,
        join_timeout_s=p.join_timeout_s,
        train_config=_train_config(topology),
    )


def protocol_config(topology: Topology) -> FedAvgConfig:
    """The FedAvg machine's config from the ``protocol:`` and ``training:`` sections."""
    p = topology.protocol
    clients = len(topology.nodes.clients)
    train = _train_config(topology)
    return FedAvgConfig(
        rounds=p.rounds,
        clients_per_round=None
        if p.clients_per_round is None
        else min(p.clients_per_round, clients),
        fraction=p.fraction,
        min_clients=min(p.min_clients, max(clients, 1)),
        round_timeout_s=p.round_timeout_s,
        join_timeout_s=p.join_timeout_s,
        evaluate=p.evaluate,
        seed=topology.seed,
        train_config=train,
    )


def model_spec(topology: Topology) -> dict[str, Any]:
    """The ``model:`` section as `make_trainer` takes it."""
    m = topology.model
    if m.factory is not None:
        return {"factory": m.factory}
    if m.kind == "mlp":
        return {"kind": "mlp", "hidden": list(m.hidden)}
    return {"kind": m.kind}


def build_data(topology: Topology, base_dir: Path) -> FederationData:
    """Every client's partition and the test split (``data:``; paths relative to ``base_dir``).

    Raises:
        ConfigError: no data section, or the learning layer refuses it.
    """
    data = topology.data
    if data is None:
        raise ConfigError("the topology has no data section", path="data")
    params: dict[str, Any] = {}
    if data.dataset == "synthetic":
        syn = data.synthetic or SyntheticConfig()
        params = {"alpha": syn.alpha, "beta": syn.beta}
        if syn.samples_per_client is not None:
            params["samples_per_client"] = syn.samples_per_client
    elif data.dataset == "npz" and data.npz is not None:
        path = Path(data.npz.path)
        params = {"path": os.fspath(path if path.is_absolute() else base_dir / path)}
    part = data.partition
    partition_params: dict[str, Any] = {}
    if part.kind == "dirichlet":
        partition_params = {"alpha": part.alpha}
    elif part.kind == "shards":
        partition_params = {"shards_per_client": part.shards_per_client}
    return build_federation_data(
        data.dataset,
        params,
        part.kind,
        partition_params,
        # Data-holding nodes in topology order: client i, device i and peer-i get part i.
        [info.id for info in topology.node_infos() if info.holds_data],
        test_fraction=data.test_fraction,
        seed=topology.seed,
    )


def server_trainer(topology: Topology, data: FederationData) -> Trainer:
    """The server's trainer: initial weights and central evaluation on the test split."""
    return make_trainer(
        model_spec(topology), None, data.test,
        num_features=data.num_features, num_classes=data.num_classes, seed=topology.seed,
    )  # fmt: skip


def client_trainer(
    topology: Topology, data: FederationData, node_id: str, *, data_file: str | None = None
) -> Trainer:
    """A client's trainer on its partition, or on its own ``.npz`` file (``--data``)."""
    if data_file is not None:
        train = load_node_data(
            data_file, num_classes=data.num_classes, num_features=data.num_features
        )
    elif node_id in data.train:
        train = data.train[node_id]
    else:
        raise ConfigError(f"no data partition for node {node_id!r}", path="--id")
    return make_trainer(
        model_spec(topology), train, None,
        num_features=data.num_features, num_classes=data.num_classes, seed=topology.seed,
    )  # fmt: skip


def fault_plan(topology: Topology, node_id: str) -> FaultPlan:
    """The faults ``node_id`` injects (none for external nodes: fedbus run does not own them)."""
    kwargs: dict[str, Any] = {}
    if node_id not in topology.nodes.external:
        for fault in topology.faults:
            match fault:
                case CrashFault() if node_id in fault.nodes:
                    kwargs["crash_round"] = min(
                        fault.at_round, kwargs.get("crash_round", fault.at_round)
                    )
                case DropoutFault():
                    kwargs["dropout"] = fault.probability
                case StragglerFault():
                    kwargs["straggler"] = fault.probability
                    kwargs["straggler_delay_s"] = fault.delay_s
                case ChurnFault():
                    kwargs["churn"] = fault.probability
                    kwargs["churn_down_rounds"] = fault.down_rounds
    return FaultPlan(node_id=node_id, seed=topology.seed, **kwargs)

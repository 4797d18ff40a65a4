"""Helpers for node tests: small topologies over the in-process bus."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fedbus.topology import Topology, loads_topology

REFERENCE = Path(__file__).parents[2] / "benchmarks" / "reference_fedavg.py"


def topology(
    *,
    name: str = "nodes-test",
    clients: int = 4,
    rounds: int = 3,
    extra_protocol: str = "",
    round_timeout_s: float = 20,
    faults: str = "",
    model: str = "{kind: mlp, hidden: [16]}",
    seed: int = 0,
    broker: str = "memory",
    external: str = "",
) -> tuple[Topology, str]:
    """A digits topology over ``broker``; returns it and its YAML text."""
    text = f"""
name: {name}
seed: {seed}
broker: {broker}
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: 0.5}}}}
model: {model}
training: {{epochs: 1, batch_size: 16, lr: 0.05}}
protocol:
  kind: centralized
  rounds: {rounds}
  round_timeout_s: {round_timeout_s}
  join_timeout_s: 20
{extra_protocol}
nodes:
  server: {{id: server}}
  clients: {{count: {clients}}}
{external}
{faults}
"""
    return loads_topology(text), text


@pytest.fixture(scope="session")
def reference() -> ModuleType:
    """benchmarks/reference_fedavg.py as a module."""
    spec = importlib.util.spec_from_file_location("reference_fedavg_nodes", REFERENCE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

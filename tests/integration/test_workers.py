"""Simulated clients in worker processes (``fedbus run --workers N``) through a real mosquitto."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedbus.broker import ManagedBroker
from fedbus.errors import ConfigError
from fedbus.launch import run_federation
from fedbus.launch.workers import share
from tests.integration.cli_helpers import fedbus, wait
from tests.nodes.conftest import topology

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_share_deals_clients_round_robin() -> None:
    ids = [f"client-{i}" for i in range(5)]
    assert share(ids, 2) == [["client-0", "client-2", "client-4"], ["client-1", "client-3"]]
    assert share(ids[:1], 3) == [["client-0"]]
    assert share([], 2) == []


async def test_workers_give_the_in_process_result(
    mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    # Prepare: one crash, so a worker-hosted client's outcome must travel back too.
    faults = "faults:\n  - {kind: crash, nodes: [client-3], at_round: 2}"
    topo, text = topology(
        name=f"w-{unique_prefix}", clients=6, rounds=3, broker=mosquitto.url,
        extra_protocol="  min_clients: 1\n", round_timeout_s=5, faults=faults,
    )  # fmt: skip
    # Execute: the same topology with clients in this process, then in two workers.
    local = await run_federation(topo, out=None, topology_text=text)
    workers = await run_federation(topo, out=None, topology_text=text, workers=2)
    # Assert: the same model bit for bit, the same outcomes, reported per client.
    assert workers.server.success, workers.server.reason
    for name, value in local.weights.items():
        assert np.array_equal(workers.weights[name], value), name
    assert {c: o.status for c, o in workers.clients.items()} == {
        c: o.status for c, o in local.clients.items()
    }
    assert workers.clients["client-3"].status == "crashed"
    assert sum(o.status == "finished" for o in workers.clients.values()) == 5


async def test_workers_are_refused_where_they_cannot_work() -> None:
    topo, text = topology(broker="memory")
    with pytest.raises(ConfigError, match="MQTT broker"):
        await run_federation(topo, out=None, topology_text=text, workers=2)
    mqtt, _ = topology(broker="mqtt://127.0.0.1:1")
    with pytest.raises(ConfigError, match="topology text"):
        await run_federation(mqtt, out=None, workers=2)


def test_fedbus_run_with_workers_leaves_no_process(tmp_path: Path, unique_prefix: str) -> None:
    # Prepare: the embedded broker, four clients in two workers.
    _, text = topology(name=f"wcli-{unique_prefix}", clients=4, rounds=2, broker="embedded")
    path = tmp_path / "t.yaml"
    path.write_text(text, encoding="utf-8")
    out, log = tmp_path / "out", tmp_path / "run.txt"
    # Execute
    run = fedbus("run", str(path), "--out", str(out), "--workers", "2", log=log)
    try:
        rc = wait(run, 90, log)
    finally:
        if run.poll() is None:
            run.kill()
    # Assert: success, every round had all four clients, and the workers are gone.
    assert rc == 0, log.read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rows] == [4, 4]
    assert not _workers_alive()


def _workers_alive() -> bool:
    """Whether a ``fedbus.launch.workers`` process started for this test is still running."""
    for cmdline in Path("/proc").glob("*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "fedbus.launch._worker" in text and "fedbus-workers-" in text:
            return True
    return False

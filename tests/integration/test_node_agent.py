"""``fedbus node`` as a separate process joining a federation that ``fedbus run`` drives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedbus.broker import ManagedBroker
from tests.integration.cli_helpers import fedbus, rows, wait, write_topology

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def test_external_node_joins_a_running_federation(
    mosquitto: ManagedBroker, tmp_path: Path, unique_prefix: str
) -> None:
    # Prepare: client-2 is external; its agent starts after the run (it finds the manifest).
    topo = write_topology(
        tmp_path / "t.yaml", name=f"ext-{unique_prefix}", external="  external: [client-2]"
    )
    out = tmp_path / "out"
    run_log, node_log = tmp_path / "run.txt", tmp_path / "node.txt"
    # Execute
    run = fedbus("run", str(topo), "--out", str(out), "--broker", mosquitto.url, log=run_log)
    agent = fedbus("node", str(topo), "--id", "client-2", "--broker", mosquitto.url, log=node_log)
    try:
        run_rc = wait(run, 60, run_log)
        agent_rc = wait(agent, 30, node_log)
    finally:
        for proc in (run, agent):
            if proc.poll() is None:
                proc.kill()
    # Assert
    assert run_rc == 0, run_log.read_text()
    assert agent_rc == 0, node_log.read_text()
    assert "the run finished" in node_log.read_text()
    assert "waiting for external node(s) client-2" in run_log.read_text()
    assert [r["participants"] for r in rows(out)] == [3, 3, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["broker"] == {"kind": "url", "url": mosquitto.url}


def test_node_refuses_unknown_ids_and_missing_broker(tmp_path: Path) -> None:
    topo = write_topology(tmp_path / "t.yaml", name="ext-bad")
    log = tmp_path / "log.txt"
    assert (
        wait(
            fedbus(
                "node", str(topo), "--id", "client-9", "--broker", "mqtt://127.0.0.1:1", log=log
            ),
            30,
            log,
        )
        == 2
    )
    assert "client-9" in log.read_text()
    assert wait(fedbus("node", str(topo), "--id", "client-0", log=log), 30, log) == 2
    assert "--broker" in log.read_text()

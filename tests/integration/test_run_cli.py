"""``fedbus run`` end to end through mosquitto: results, Ctrl-C, --resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from fedbus.broker import find_mosquitto
from tests.integration.cli_helpers import (
    alive,
    children,
    fedbus,
    rows,
    wait,
    wait_for_rows,
    write_topology,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(90),
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]


def test_run_with_the_embedded_broker_writes_the_results_folder(tmp_path: Path) -> None:
    topo = write_topology(tmp_path / "t.yaml", name="cli-run")
    out, log = tmp_path / "out", tmp_path / "log.txt"
    rc = wait(fedbus("run", str(topo), "--out", str(out), log=log), 60, log)
    text = log.read_text()
    assert rc == 0, text
    assert "round 3/3" in text
    assert "broker embedded" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert summary["broker"]["kind"] == "embedded"
    assert summary["broker"]["url"].startswith("mqtt://127.0.0.1:")
    assert [r["participants"] for r in rows(out)] == [3, 3, 3]
    assert all(r["bytes_up"] > 0 for r in rows(out))
    assert (out / "model.msgpack").is_file()
    assert (out / "checkpoint.msgpack").is_file()


def test_invalid_and_unsupported_topologies_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nprotocol: {rounds: 0}\nnodes: {server: {id: s}, clients: {count: 2}}\n"
    )
    log = tmp_path / "log.txt"
    assert wait(fedbus("run", str(bad), log=log), 30, log) == 2
    assert "protocol.rounds" in log.read_text()
    no_data = tmp_path / "no-data.yaml"
    no_data.write_text(
        "name: g\nprotocol: {kind: gossip}\n"
        "nodes: {peers: {count: 2}, graph: {kind: ring}, external: [peer-0, peer-1]}\n"
    )
    assert wait(fedbus("run", str(no_data), log=log), 30, log) == 2
    assert "without a data section is not supported yet" in log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_ctrl_c_stops_everything_and_resume_finishes(tmp_path: Path, sig: signal.Signals) -> None:
    # Prepare: a run long enough to interrupt.
    topo = write_topology(tmp_path / "t.yaml", name="cli-sigint", rounds=200, epochs=3)
    out, log = tmp_path / "out", tmp_path / "log.txt"
    proc = fedbus("run", str(topo), "--out", str(out), log=log)
    try:
        wait_for_rows(out, 2, 60)
        descendants = children(proc.pid)
        assert descendants, "the embedded broker should be a child process"
        # Execute
        proc.send_signal(sig)
        rc = wait(proc, 30, log)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Assert: clean stop, nothing left behind, a resumable checkpoint.
    assert rc == 130, log.read_text()
    assert "--resume" in log.read_text()
    assert [pid for pid in descendants if alive(pid)] == []
    done = len(rows(out))
    assert done >= 2
    assert (out / "checkpoint.msgpack").is_file()
    # Resume, stopping two rounds later.
    log2 = tmp_path / "log2.txt"
    resume = fedbus("run", str(topo), "--resume", str(out), "--rounds", str(done + 2), log=log2)
    assert wait(resume, 60, log2) == 0, log2.read_text()
    assert [r["round"] for r in rows(out)] == list(range(1, done + 3))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == done + 2
    assert summary["success"] is True

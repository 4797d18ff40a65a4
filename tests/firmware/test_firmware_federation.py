"""Firmware clients in a real federation, through mosquitto.

fedbus run (server and 8 Python clients), 2 C firmware clients and one
MicroPython-logic client as external nodes, through a mosquitto that enforces a
small packet limit, so every model broadcast and every update travels in chunks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedbus.broker import ManagedBroker, find_mosquitto
from fedbus.launch.build import build_data
from fedbus.topology import load_topology
from tests.firmware.firmware_helpers import ROOT, write_bin, write_csv

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# 1024 bytes: the digits logreg model (64 x 10 float32, about 2.8 kB encoded) fits in a 4096-byte
# packet whole, so 4096 would not exercise chunking; 1024 (the smallest limit fedbus accepts)
# splits broadcasts and updates into about five chunks each.
MAX_PAYLOAD_BYTES = 1024
ROUNDS = 5
C_CLIENTS = ("client-8", "client-9")
MP_CLIENT = "client-10"

TOPOLOGY = """
name: {name}
seed: 3
broker: {{url: "{url}", max_payload_bytes: {max_payload}}}
data: {{dataset: digits, partition: iid}}
model: logreg
training: {{epochs: 5, batch_size: 100000, lr: 0.5}}
protocol:
  kind: centralized
  rounds: {rounds}
  min_clients: 11
  round_timeout_s: 60
  join_timeout_s: 60
nodes:
  server: {{id: server}}
  clients: {{count: 11}}
{external}
"""


@pytest.fixture(scope="module")
def limited_broker() -> Any:
    """A mosquitto that disconnects any client sending a packet over MAX_PAYLOAD_BYTES."""
    if find_mosquitto() is None:
        reason = "mosquitto is not installed (apt install mosquitto)"
        if os.environ.get("FEDBUS_REQUIRE_MOSQUITTO") == "1":
            pytest.fail(f"FEDBUS_REQUIRE_MOSQUITTO=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    broker = ManagedBroker(kind="mosquitto", max_payload_bytes=MAX_PAYLOAD_BYTES)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip


def _wait(proc: subprocess.Popen[bytes], deadline: float, log: Path) -> int:
    try:
        return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args} did not exit in time:\n{log.read_text()}") from None


def _stats(log: Path) -> dict[str, int]:
    lines = [line for line in log.read_text().splitlines() if line.startswith("stats ")]
    assert lines, log.read_text()
    stats: dict[str, int] = json.loads(lines[-1][len("stats ") :])
    return stats


def _summary(out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


def _run_federation(
    tmp: Path, url: str, external: list[str], c_client: Path | None
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[str, int]]]:
    name = "fw" if external else "py"
    topo = tmp / f"{name}.yaml"
    ext = f"  external: [{', '.join(external)}]" if external else ""
    topo.write_text(
        TOPOLOGY.format(
            name=name, url=url, max_payload=MAX_PAYLOAD_BYTES, rounds=ROUNDS, external=ext
        ),
        encoding="utf-8",
    )
    out = tmp / f"out-{name}"
    deadline = time.monotonic() + 150
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        if external:
            data = build_data(load_topology(topo), tmp)
            host_port = url.removeprefix("mqtt://")
            assert c_client is not None
            for i, node in enumerate(C_CLIENTS):
                train = data.train[node]
                x = train.x.reshape(len(train), -1)
                writer = write_bin if i == 0 else write_csv  # both data formats
                file = writer(tmp / f"{node}.{'bin' if i == 0 else 'csv'}", x, train.y)
                cmd = [str(c_client), "--broker", host_port, "--id", node, "--namespace", name,
                       "--data", str(file), "--max-payload-bytes", str(MAX_PAYLOAD_BYTES), "--timeout-s", "140"]  # fmt: skip
                procs.append((node, _start(cmd, tmp / f"{node}.log"), tmp / f"{node}.log"))
            train = data.train[MP_CLIENT]
            file = write_csv(tmp / f"{MP_CLIENT}.csv", train.x.reshape(len(train), -1), train.y)
            cmd = [sys.executable, str(ROOT / "tests" / "firmware" / "mp_runner.py"), "--broker", host_port,
                   "--id", MP_CLIENT, "--namespace", name, "--data", str(file),
                   "--max-payload-bytes", str(MAX_PAYLOAD_BYTES), "--timeout-s", "140"]  # fmt: skip
            procs.append(
                (MP_CLIENT, _start(cmd, tmp / f"{MP_CLIENT}.log"), tmp / f"{MP_CLIENT}.log")
            )
        run_log = tmp / f"run-{name}.log"
        run = _start([sys.executable, "-m", "fedbus", "run", str(topo), "--out", str(out)], run_log)
        assert _wait(run, deadline, run_log) == 0, run_log.read_text()
        stats = {}
        for node, proc, log in procs:
            assert _wait(proc, deadline, log) == 0, f"{node}:\n{log.read_text()}"
            stats[node] = _stats(log)
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return _summary(out), metrics, stats


def test_c_and_micropython_clients_in_a_real_federation(
    limited_broker: ManagedBroker, c_client: Path, tmp_path: Path
) -> None:
    url = limited_broker.url
    summary, metrics, stats = _run_federation(tmp_path, url, [*C_CLIENTS, MP_CLIENT], c_client)
    assert summary["success"]
    assert summary["rounds_completed"] == ROUNDS
    assert [row["participants"] for row in metrics] == [11] * ROUNDS
    assert all(row["rejected"] == {} for row in metrics)
    for node, s in stats.items():
        # every round answered, and chunking both ways: model broadcasts in, updates out
        assert s["updates_sent"] == ROUNDS, (node, s)
        assert s["rounds_trained"] == ROUNDS, (node, s)
        assert s["chunks_received"] >= ROUNDS * 2, (node, s)
        assert s["chunks_sent"] >= ROUNDS * 2, (node, s)
        assert s["credits_received"] >= ROUNDS, (node, s)

    # the same federation with Python nodes only reaches the same accuracy (full-batch GD everywhere)
    py_summary, _, _ = _run_federation(tmp_path, url, [], None)
    print(
        f"final accuracy: with firmware clients {summary['final_accuracy']:.4f}, "
        f"all-Python {py_summary['final_accuracy']:.4f}; firmware stats {stats}"
    )
    assert summary["final_accuracy"] > 0.8
    assert abs(summary["final_accuracy"] - py_summary["final_accuracy"]) <= 0.02

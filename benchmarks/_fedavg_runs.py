"""Helpers of bench_fedavg.py: topologies, a measured ``fedbus run`` subprocess, a $SYS broker.

`run_fedbus` starts ``python -m fedbus run`` exactly as a user would and,
while it runs, samples the resident memory of its whole process tree (the
embedded mosquitto included, plus an ``extra_pids`` broker started here) and
notes when the first row of ``metrics.jsonl`` appears, which is the end of
round 1 as seen from outside (polled every 10 ms). `SysBroker` is a mosquitto
started by the benchmark with ``sys_interval 1``, so its cumulative
``$SYS/broker/messages/received|sent`` counters can be read before and after
a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fedbus.broker import find_mosquitto
from fedbus.broker._net import free_port
from fedbus.broker.mosquitto import render_mosquitto_conf
from fedbus.config import BrokerConfig
from fedbus.transport.mqtt import MqttTransport

ROOT = Path(__file__).resolve().parents[1]

DIGITS = """\
name: {name}
seed: {seed}
broker: {broker}
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: 0.5}}}}
model: {{kind: mlp, hidden: [32]}}
training: {{epochs: 1, batch_size: 16, lr: 0.05}}
protocol:
  kind: centralized
  rounds: {rounds}
  clients_per_round: 20
  min_clients: {min_clients}
  round_timeout_s: {round_timeout_s}
  join_timeout_s: 60
nodes:
  server: {{id: server}}
  clients: {{count: 20}}
{faults}
"""

FAULTS = """\
faults:
  - {kind: dropout, probability: 0.3}
  - {kind: crash, nodes: [client-3, client-7, client-11], at_round: 2}
"""

SYNTHETIC = """\
name: {name}
seed: {seed}
broker: {broker}
data: {{dataset: synthetic, synthetic: {{alpha: 1, beta: 1}}, partition: natural}}
model: logreg
training: {{epochs: 20, batch_size: 10, lr: 0.01, mu: {mu}}}
protocol:
  kind: centralized
  rounds: {rounds}
  clients_per_round: 10
  round_timeout_s: 120
  join_timeout_s: 60
nodes:
  server: {{id: server}}
  clients: {{count: 30}}
"""

OVERHEAD = """\
name: {name}
seed: 0
broker: {broker}
data:
  dataset: synthetic
  synthetic: {{alpha: 0, beta: 0, samples_per_client: 20}}
  partition: natural
model: logreg
training: {{epochs: 1, batch_size: 10, lr: 0.01}}
protocol:
  kind: centralized
  rounds: {rounds}
  min_clients: {clients}
  round_timeout_s: 300
  join_timeout_s: 300
nodes:
  server: {{id: server}}
  clients: {{count: {clients}}}
"""


@dataclass
class RunResult:
    """What one measured ``fedbus run`` gave."""

    rc: int
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    wall_s: float
    first_round_s: float | None
    peak_rss_mb: float
    log: str
    out: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float:
        return float(self.rows[-1]["accuracy"]) if self.rows else float("nan")

    def round_walls(self, skip_first: bool = False) -> list[float]:
        rows = self.rows[1:] if skip_first and len(self.rows) > 1 else self.rows
        return [float(r["wall_s"]) for r in rows]


def _tree_rss(proc: psutil.Process, extra: list[psutil.Process]) -> int:
    total = 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        members = []
    for p in [*members, *extra]:
        with contextlib.suppress(psutil.Error):  # a process may end between the calls
            total += p.memory_info().rss
    return total


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_fedbus(
    topology_text: str,
    workdir: Path,
    *,
    args: tuple[str, ...] = (),
    extra_pids: tuple[int, ...] = (),
    timeout_s: float = 900,
    sample_s: float = 0.05,
) -> RunResult:
    """Run ``fedbus run`` on ``topology_text`` in a subprocess, measuring it (module docstring)."""
    workdir.mkdir(parents=True, exist_ok=True)
    topo = workdir / "topology.yaml"
    topo.write_text(topology_text, encoding="utf-8")
    out = workdir / "out"
    log_path = workdir / "log.txt"
    extra = [psutil.Process(pid) for pid in extra_pids]
    metrics = out / "metrics.jsonl"
    with log_path.open("wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedbus", "run", str(topo), "--out", str(out), *args],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        ps = psutil.Process(proc.pid)
        peak, first, next_sample = 0, None, 0.0
        try:
            while proc.poll() is None:
                now = time.perf_counter()
                if now - started > timeout_s:
                    raise TimeoutError(f"fedbus run did not finish in {timeout_s} s")
                if first is None and metrics.exists() and metrics.stat().st_size > 0:
                    first = now - started
                if now >= next_sample:
                    peak = max(peak, _tree_rss(ps, extra))
                    next_sample = now + sample_s
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        wall = time.perf_counter() - started
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return RunResult(
        rc=proc.returncode, rows=_rows(metrics), summary=summary, wall_s=wall,
        first_round_s=first, peak_rss_mb=peak / 1e6, log=log_path.read_text(), out=out,
    )  # fmt: skip


class SysBroker:
    """A mosquitto of our own with ``sys_interval 1``, for its $SYS message counters.

    The config is fedbus's own (`render_mosquitto_conf`), plus that one line:
    the embedded broker keeps mosquitto's default of 10 s, too coarse to read
    counters around a run of a few seconds.
    """

    def __init__(self) -> None:
        exe = find_mosquitto()
        if exe is None:
            raise SystemExit("mosquitto is not installed")
        self._tmp = tempfile.TemporaryDirectory(prefix="fedbus-bench-")
        tmp = Path(self._tmp.name)
        self.port = free_port("127.0.0.1")
        conf = render_mosquitto_conf(
            host="127.0.0.1", port=self.port, allow_anonymous=True, log_path=tmp / "mosquitto.log"
        )
        (tmp / "mosquitto.conf").write_text(conf + "sys_interval 1\n")
        self.proc = subprocess.Popen(
            [exe, "-c", str(tmp / "mosquitto.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.url = f"mqtt://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                self.counters()
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise
                time.sleep(0.2)

    def open_files_limit(self) -> str:
        """The broker child's ``Max open files`` line of /proc/PID/limits."""
        for line in Path(f"/proc/{self.proc.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return " ".join(line.split()[3:5])
        return "?"

    def counters(self, timeout_s: float = 5.0) -> dict[str, int]:
        """Fresh $SYS counters (waits for the next publication).

        Keys: ``messages_received|sent`` (MQTT packets of all types) and
        ``publish_received|sent`` (PUBLISH packets only).
        """
        return asyncio.run(self._counters(timeout_s))

    async def _counters(self, timeout_s: float) -> dict[str, int]:
        config = BrokerConfig(host="127.0.0.1", port=self.port, protocol="3.1.1")
        want = {
            "$SYS/broker/messages/received",  # MQTT packets of every type (PUBACKs too)
            "$SYS/broker/messages/sent",
            "$SYS/broker/publish/messages/received",  # PUBLISH packets only
            "$SYS/broker/publish/messages/sent",
        }
        retained: dict[str, int] = {}
        fresh: dict[str, int] = {}
        async with MqttTransport(config, f"bench-sys-{os.getpid()}") as t:
            for topic in want:
                await t.subscribe(topic, qos=0)
            # mosquitto republishes a $SYS value only when it changed: take the
            # retained one when no fresh one comes within the timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    async for msg in t.messages():
                        name = msg.topic.removeprefix("$SYS/broker/").replace("/messages/", "_")
                        name = name.replace("messages/", "messages_")
                        (retained if msg.retain else fresh)[name] = int(msg.payload)
                        if len(fresh) == len(want):
                            break
        return retained | fresh

    def close(self) -> None:
        """Stop the broker and remove its files."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._tmp.cleanup()

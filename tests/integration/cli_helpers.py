"""Running the fedbus CLI as a subprocess in integration tests, with deadlines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TOPOLOGY = """
name: {name}
seed: 0
broker: {broker}
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: 0.5}}}}
model: {{kind: mlp, hidden: [16]}}
training: {{epochs: {epochs}, batch_size: 16, lr: 0.05}}
protocol:
  kind: centralized
  rounds: {rounds}
  min_clients: 2
  round_timeout_s: 20
  join_timeout_s: 30
nodes:
  server: {{id: server}}
  clients: {{count: 3}}
{external}
"""


def write_topology(path: Path, **fields: Any) -> Path:
    values = {"broker": "embedded", "epochs": 1, "rounds": 3, "external": ""} | fields
    path.write_text(TOPOLOGY.format(**values), encoding="utf-8")
    return path


def fedbus(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start ``fedbus ARGS`` with stdout and stderr going to ``log``."""
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "fedbus", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def wait(proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"fedbus did not exit in {timeout_s} s:\n{log.read_text()}") from None


def rows(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_rows(out: Path, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(rows(out)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} rounds after {timeout_s} s"
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"

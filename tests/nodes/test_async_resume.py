"""``fedbus run --resume`` for an asynchronous (FedBuff) run interrupted midway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.cli import main
from fedbus.launch import run_federation
from fedbus.launch.build import build_data
from fedbus.launch.federation import make_server
from fedbus.nodes import ServerObserver, read_checkpoint
from fedbus.protocols.fedbuff import FedBuffServer
from fedbus.topology import loads_topology
from fedbus.transport.memory import MemoryBus, MemoryTransport
from tests.nodes.conftest import topology

pytestmark = pytest.mark.timeout(90)

_ASYNC = "  mode: async\n  buffer_size: 2\n  max_staleness: 4\n"


class _CancelAfter(ServerObserver):
    def __init__(self, task: asyncio.Task[Any], version: int) -> None:
        self.task, self.version = task, version

    def on_round(self, row: Mapping[str, Any]) -> None:
        if row["round"] == self.version:
            self.task.cancel()  # as Ctrl-C does to fedbus run


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


async def _interrupt(out: Path, version: int) -> str:
    """Run the topology until ``version`` is recorded, then cancel it; returns its text."""
    topo, text = topology(name="async-resume", clients=3, rounds=10, extra_protocol=_ASYNC)
    holder: dict[str, asyncio.Task[Any]] = {}

    async def interrupted() -> None:
        await run_federation(
            topo, out=out, topology_text=text, observer=_CancelAfter(holder["t"], version)
        )

    holder["t"] = asyncio.create_task(interrupted())
    with pytest.raises(asyncio.CancelledError):
        await holder["t"]
    return text


def test_an_interrupted_async_run_resumes_from_its_last_aggregation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: 3 clients, K = 2, 10 aggregations; cancelled once version 4 is recorded.
    path, out = tmp_path / "t.yaml", tmp_path / "run"
    path.write_text(asyncio.run(_interrupt(out, 4)))
    checkpoint = read_checkpoint(out / "checkpoint.msgpack")
    assert 4 <= checkpoint.round < 10
    before = _rows(out)
    topo = loads_topology(path.read_text())
    server = make_server(
        topo, build_data(topo, tmp_path), MemoryTransport(MemoryBus(), "server"),
        run_id=checkpoint.run, out=None, resume=checkpoint,
    )  # fmt: skip
    assert isinstance(server.machine, FedBuffServer)
    assert server.machine.version == checkpoint.round  # the server continues the checkpoint's model
    for name, array in checkpoint.weights.items():
        assert np.asarray(server.machine.weights[name]).tobytes() == array.tobytes()
    # Execute: the command a user runs after Ctrl-C.
    code = main(["run", str(path), "--resume", str(out)])
    # Assert
    assert code == 0, capsys.readouterr().err
    assert f"resuming after round {checkpoint.round}" in capsys.readouterr().out
    rows = _rows(out)
    assert [r["round"] for r in rows] == list(range(1, 11))  # no version twice, none missing
    assert rows[: checkpoint.round] == before[: checkpoint.round]  # the kept rows untouched
    assert all(r["participants"] == 2 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["success"] is True
    assert summary["run"] == checkpoint.run  # the resumed run keeps its id
    assert summary["rounds_completed"] == 10
    assert summary["wall_s"] >= checkpoint.elapsed_s
    assert read_checkpoint(out / "checkpoint.msgpack").round == 10

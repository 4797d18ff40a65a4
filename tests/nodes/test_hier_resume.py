"""An interrupted hierarchical run resumed from its folder ends where the uninterrupted one does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hier_helpers import hier, hier_text, rows

from fedbus.cli import main
from fedbus.launch.hierarchical import run_hierarchical
from fedbus.nodes import ServerObserver, read_checkpoint
from fedbus.nodes.edge_checkpoint import read_edge_checkpoint
from fedbus.topology import loads_topology

pytestmark = pytest.mark.timeout(120)

# edge-a keeps state across rounds (FedAvgM's momentum): a resume that lost it,
# or restarted the edge's local round numbers (the devices' seeds), would differ.
STATEFUL = ", aggregator: {kind: fedavgm, momentum: 0.5}"


class _CancelAfter(ServerObserver):
    def __init__(self, task: asyncio.Task[Any], round_num: int) -> None:
        self.task, self.round_num = task, round_num

    def on_round(self, row: Mapping[str, Any]) -> None:
        if row["round"] == self.round_num:
            self.task.cancel()  # as Ctrl-C does to fedbus run


async def _interrupt(out: Path, text: str, after: int) -> None:
    topology = loads_topology(text)
    holder: dict[str, asyncio.Task[Any]] = {}

    async def interrupted() -> None:
        await run_hierarchical(
            topology, out=out, topology_text=text, observer=_CancelAfter(holder["t"], after)
        )

    holder["t"] = asyncio.create_task(interrupted())
    with pytest.raises(asyncio.CancelledError):
        await holder["t"]


async def test_resume_reproduces_the_uninterrupted_hierarchical_run(tmp_path: Path) -> None:
    # Prepare: the uninterrupted run.
    topology, text = hier(rounds=4, edge_a=STATEFUL), hier_text(rounds=4, edge_a=STATEFUL)
    full = await run_hierarchical(topology, out=tmp_path / "full")
    assert full.server.success, full.server.reason
    # Execute: interrupt after global round 2, then resume from the folder.
    out = tmp_path / "cut"
    await _interrupt(out, text, after=2)
    checkpoint = read_checkpoint(out / "checkpoint.msgpack")
    assert 2 <= checkpoint.round < 4
    edge = read_edge_checkpoint(
        out / "edges", "edge-a", run=checkpoint.run, top_round=checkpoint.round
    )
    assert edge is not None
    assert edge.top_round == checkpoint.round
    assert edge.local_base == 2 * checkpoint.round  # edge_rounds local rounds per global round
    assert edge.aggregator_state  # the momentum buffer
    resumed = await run_hierarchical(topology, out=out, resume=checkpoint)
    # Assert
    assert resumed.server.success, resumed.server.reason
    assert resumed.run_id == checkpoint.run
    for name, array in full.weights.items():
        assert resumed.weights[name].tobytes() == np.asarray(array).tobytes(), name
    found = rows(out)
    assert [r["round"] for r in found] == [1, 2, 3, 4]
    full_rows = rows(tmp_path / "full")
    assert [r["accuracy"] for r in found] == [r["accuracy"] for r in full_rows]
    assert [r["edge_accuracy"] for r in found] == [r["edge_accuracy"] for r in full_rows]
    summary = json.loads((out / "summary.json").read_text())
    full_summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["model_sha256"] == full_summary["model_sha256"]
    assert summary["rounds_completed"] == 4


def test_fedbus_run_resume_continues_a_hierarchical_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a run interrupted after round 1, as Ctrl-C leaves it.
    text = hier_text(rounds=3)
    path = tmp_path / "hier.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    asyncio.run(_interrupt(out, text, after=1))
    done = read_checkpoint(out / "checkpoint.msgpack").round
    # Execute
    code = main(["run", str(path), "--resume", str(out)])
    # Assert
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = captured.out
    assert f"resuming after round {done}" in printed
    assert [r["round"] for r in rows(out)] == [1, 2, 3]

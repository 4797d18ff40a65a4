"""``protocol.mode: async`` end to end over the in-process bus: FedBuff with stragglers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedbus.launch import run_federation
from tests.nodes.conftest import topology

pytestmark = pytest.mark.timeout(60)

_STRAGGLERS = "faults:\n  - {kind: straggler, probability: 0.3, delay_s: 0.1}"


def _async(buffer_size: int, max_staleness: int) -> str:
    return (
        f"  mode: async\n  buffer_size: {buffer_size}\n  max_staleness: {max_staleness}\n"
        "  server_lr: 1.0\n  staleness_exponent: 0.5"
    )


def _rows(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


async def test_async_run_with_stragglers_learns_and_records_staleness(tmp_path: Path) -> None:
    # Prepare: 6 clients, K = 3, 30 aggregations; stragglers answer 0.1 s late.
    topo, text = topology(clients=6, rounds=30, extra_protocol=_async(3, 6), faults=_STRAGGLERS)
    # Execute
    result = await run_federation(topo, out=tmp_path, topology_text=text)
    # Assert
    assert result.server.success, result.server.reason
    assert {o.status for o in result.clients.values()} == {"finished"}
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == list(range(1, 31))
    assert {r["participants"] for r in rows} == {3}
    assert all(isinstance(r["staleness_mean"], float) for r in rows)
    assert any(float(r["staleness_mean"]) > 0 for r in rows)  # stale updates were aggregated
    assert float(rows[-1]["accuracy"]) > 0.6  # type: ignore[arg-type]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["success"] is True
    assert summary["rounds_completed"] == 30
    assert (tmp_path / "model.msgpack").exists()


async def test_updates_beyond_max_staleness_are_rejected_and_counted(tmp_path: Path) -> None:
    # Prepare: K = 1 moves the version on with every update, so with
    # max_staleness 0 every update that was in flight meanwhile is refused.
    topo, text = topology(clients=4, rounds=12, extra_protocol=_async(1, 0), faults=_STRAGGLERS)
    # Execute
    result = await run_federation(topo, out=tmp_path, topology_text=text)
    # Assert
    assert result.server.success, result.server.reason
    rows = _rows(tmp_path)
    assert all(r["staleness_mean"] == 0.0 for r in rows)
    stale = sum(int(r["rejected"].get("stale_round", 0)) for r in rows)  # type: ignore[attr-defined]
    assert stale > 0

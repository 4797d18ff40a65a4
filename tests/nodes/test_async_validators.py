"""``protocol.validators`` under ``mode: async``: a sign-flip attacker's updates are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedbus.launch import run_federation
from fedbus.topology import loads_topology

pytestmark = pytest.mark.timeout(90)


def _yaml(validators: str) -> str:
    """Five digits clients, K = 5: every buffer holds one update of each client.

    With K equal to the clients, the version moves on only when all five have
    answered it, so each buffer holds exactly one update of the attacker.
    """
    return (
        "name: robust-async\nseed: 0\nbroker: memory\n"
        "data: {dataset: digits, partition: {kind: dirichlet, alpha: 0.5}}\n"
        "model: {kind: mlp, hidden: [32]}\n"
        "protocol:\n  mode: async\n  rounds: 20\n  buffer_size: 5\n  max_staleness: 10\n"
        f"  round_timeout_s: 20\n{validators}"
        "nodes: {server: server, clients: 5}\n"
        "attacks:\n  - {kind: sign_flip, fraction: 0.2}\n"
    )


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


async def test_norm_outlier_refuses_the_sign_flipper_in_every_buffer(tmp_path: Path) -> None:
    # Prepare
    defended = loads_topology(_yaml("  validators: [{kind: norm_outlier}]\n"))
    # Execute
    attacked = await run_federation(loads_topology(_yaml("")), out=tmp_path / "a")
    result = await run_federation(defended, out=tmp_path / "d")
    # Assert
    assert attacked.server.success, attacked.server.reason
    assert result.server.success, result.server.reason
    assert [len(nodes) for nodes in defended.attackers()] == [1]  # one sign-flipper
    rows = _rows(tmp_path / "d")
    assert [r["round"] for r in rows] == list(range(1, 21))
    for row in rows:  # the attacker every time, an honest outlier now and then
        assert row["rejected"].get("norm_outlier", 0) >= 1, row
        assert set(row["rejected"]) == {"norm_outlier"}, row
        assert row["participants"] + row["rejected"]["norm_outlier"] == 5, row
    undefended = _rows(tmp_path / "a")
    assert all(r["rejected"] == {} and r["participants"] == 5 for r in undefended)
    # The attack works (harness sanity) and the defense undoes it.
    assert undefended[-1]["accuracy"] < rows[-1]["accuracy"] - 0.3, (undefended[-1], rows[-1])
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert [v["kind"] for v in summary["validators"]] == ["norm_outlier"]

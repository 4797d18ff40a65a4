"""Simulated faults and failing trainers: rounds close with the rest, the run goes on."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.launch import run_federation
from fedbus.launch.build import fault_plan
from fedbus.learning.trainer import FitConfig, FitResult, Trainer
from tests.nodes.conftest import topology

pytestmark = pytest.mark.timeout(60)

SHORT = "  min_clients: 1\n"


def rows_of(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


async def test_crashed_client_is_dropped_and_rounds_continue(tmp_path: Path) -> None:
    topo, _ = topology(
        clients=4, rounds=3, extra_protocol=SHORT, round_timeout_s=1,
        faults="faults:\n  - {kind: crash, nodes: [client-3], at_round: 2}",
    )  # fmt: skip
    result = await run_federation(topo, out=tmp_path)
    assert result.server.success, result.server.reason
    assert result.clients["client-3"].status == "crashed"
    assert {result.clients[f"client-{i}"].status for i in range(3)} == {"finished"}
    rows = rows_of(tmp_path)
    assert [r["participants"] for r in rows] == [4, 3, 3]
    assert rows[1]["dropped"] + rows[1]["participants"] in (
        3,
        4,
    )  # selected before or after the will


async def test_dropout_skips_rounds_deterministically(tmp_path: Path) -> None:
    topo, _ = topology(
        clients=4, rounds=3, extra_protocol=SHORT, round_timeout_s=1,
        faults="faults:\n  - {kind: dropout, probability: 0.5}",
    )  # fmt: skip
    expected = [sum(fault_plan(topo, f"client-{i}").drops(r) for i in range(4)) for r in (1, 2, 3)]
    assert 0 < sum(expected) < 12, "the seed should drop some, not all"
    result = await run_federation(topo, out=tmp_path)
    rows = rows_of(tmp_path)
    if all(e < 4 for e in expected):
        assert result.server.success, result.server.reason
    assert [r["dropped"] for r in rows] == expected[: len(rows)]
    assert [r["participants"] for r in rows] == [4 - e for e in expected[: len(rows)]]


async def test_stragglers_answer_after_the_deadline_and_are_not_aggregated(tmp_path: Path) -> None:
    topo, _ = topology(
        clients=4, rounds=3, extra_protocol=SHORT, round_timeout_s=1,
        faults="faults:\n  - {kind: straggler, probability: 0.5, delay_s: 2.5}",
    )  # fmt: skip
    late = [
        sum(fault_plan(topo, f"client-{i}").delay_s(r) > 0 for i in range(4)) for r in (1, 2, 3)
    ]
    assert sum(late) > 0
    assert all(n < 4 for n in late)
    result = await run_federation(topo, out=tmp_path)
    assert result.server.success, result.server.reason
    rows = rows_of(tmp_path)
    assert [r["dropped"] for r in rows] == late
    # A late update reaches a later round: refused as stale, never aggregated.
    rejected = sum(r["rejected"].get("stale_round", 0) for r in rows)
    assert rejected <= sum(late[:-1])


class Failing:
    """A trainer whose fit always raises (evaluation still works)."""

    def __init__(self, inner: Trainer) -> None:
        self.inner = inner
        self.train = getattr(inner, "train", None)

    def initial_weights(self, seed: int) -> dict[str, np.ndarray[Any, Any]]:
        return self.inner.initial_weights(seed)

    def fit(self, weights: Mapping[str, np.ndarray[Any, Any]], config: FitConfig) -> FitResult:
        raise RuntimeError("disk on fire")

    def evaluate(self, weights: Mapping[str, np.ndarray[Any, Any]]) -> Any:
        return self.inner.evaluate(weights)


async def test_a_client_raising_in_fit_reports_failure_and_the_run_continues(
    tmp_path: Path,
) -> None:
    # Prepare: a long deadline, so only the failure report can close rounds early.
    topo, _ = topology(clients=3, rounds=2, extra_protocol="  min_clients: 2\n")

    def hook(node: str, trainer: Trainer) -> Trainer:
        return Failing(trainer) if node == "client-1" else trainer

    # Execute
    result = await run_federation(topo, out=tmp_path, trainer_hook=hook)
    # Assert
    assert result.server.success, result.server.reason
    rows = rows_of(tmp_path)
    assert [(r["participants"], r["dropped"]) for r in rows] == [(2, 1), (2, 1)]
    assert all(r["wall_s"] < 20 for r in rows), "closed by the failure report, not the deadline"
    assert result.clients["client-1"].status == "finished"

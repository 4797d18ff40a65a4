"""An asynchronous run whose clients all crash ends by itself, with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedbus.cli import main
from tests.nodes.conftest import topology

pytestmark = pytest.mark.timeout(60)

_ASYNC = "  mode: async\n  buffer_size: 2\n  max_staleness: 4\n"
_ALL_CRASH = (
    "faults:\n  - {kind: crash, nodes: [client-0, client-1, client-2, client-3], at_round: 3}"
)


def test_all_clients_crash_and_the_run_ends_at_the_aggregation_deadline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: 4 clients, K = 2, 50 aggregations asked for; every client dies
    # when model version 2 (wire round 3) reaches it. The deadline is 2 s.
    _, text = topology(
        name="async-crash", clients=4, rounds=50, extra_protocol=_ASYNC,
        round_timeout_s=2, faults=_ALL_CRASH,
    )  # fmt: skip
    path = tmp_path / "t.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    # Execute: no Ctrl-C needed; the run must end on its own.
    code = main(["run", str(path), "--out", str(out)])
    # Assert
    assert code == 1
    err = capsys.readouterr().err
    assert "fedbus run failed: no update accepted for 2 s at version " in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["success"] is False
    assert summary["reason"].startswith("no update accepted for 2 s at version ")
    assert summary["reason"].endswith("0 live node(s)")  # every client's will arrived
    assert 2 <= summary["rounds_completed"] < 50
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, summary["rounds_completed"] + 1))

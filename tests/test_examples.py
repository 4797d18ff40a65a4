"""The shipped examples: every one validates, and the quickstart runs end to end.

``examples/quickstart.yaml`` is the README's first command, so it is run for
real: over the in-process bus with two rounds (fast), and through the
embedded mosquitto as ``fedbus run`` in a subprocess (integration). The
longer examples (200 synthetic rounds, faults closing at 5 s deadlines) are
exercised by ``benchmarks/bench_fedavg.py``, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedbus.broker import find_mosquitto
from fedbus.cli import main
from fedbus.launch.build import unsupported_reason
from fedbus.topology import load_topology

EXAMPLES = Path(__file__).parents[1] / "examples"
QUICKSTART = EXAMPLES / "quickstart.yaml"
ALL = sorted(EXAMPLES.glob("*.yaml"))


def _rows(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_examples_are_there() -> None:
    names = {p.name for p in ALL}
    assert {
        "quickstart.yaml",
        "synthetic.yaml",
        "fedprox.yaml",
        "faults.yaml",
        "external-node.yaml",
    } <= names
    assert (EXAMPLES / "README.md").is_file()


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_every_example_validates_and_is_runnable(path: Path) -> None:
    # Execute: what `fedbus validate` and `fedbus run` check first.
    topology = load_topology(path)
    # Assert
    assert unsupported_reason(topology) is None
    assert topology.name == path.stem


def test_every_example_validates_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    for path in ALL:
        assert main(["validate", str(path)]) == 0, capsys.readouterr()


def test_examples_say_what_the_issue_asks() -> None:
    quick = load_topology(QUICKSTART)
    assert quick.data is not None
    assert (quick.data.dataset, quick.data.partition.kind) == ("digits", "dirichlet")
    assert len(quick.nodes.clients) == 10
    assert quick.broker.kind == "embedded"
    synthetic = load_topology(EXAMPLES / "synthetic.yaml")
    fedprox = load_topology(EXAMPLES / "fedprox.yaml")
    assert synthetic.training.mu == 0
    assert fedprox.training.mu == 1
    # The FedProx example is the synthetic one plus mu: same data, model, protocol.
    assert (fedprox.data, fedprox.model, fedprox.protocol, fedprox.seed) == (
        synthetic.data, synthetic.model, synthetic.protocol, synthetic.seed,
    )  # fmt: skip
    assert len(synthetic.nodes.clients) == 30
    assert synthetic.protocol.clients_per_round == 10
    faults = load_topology(EXAMPLES / "faults.yaml")
    assert sorted(type(f).__name__ for f in faults.faults) == ["CrashFault", "DropoutFault"]
    assert faults.protocol.min_clients == 8
    external = load_topology(EXAMPLES / "external-node.yaml")
    assert list(external.nodes.external) == ["client-3"]
    assert "fedbus node examples/external-node.yaml --id client-3" in (
        EXAMPLES / "external-node.yaml"
    ).read_text().replace("\\\n", "").replace("  ", " ").replace("  ", " ")


@pytest.mark.timeout(60)
def test_quickstart_runs_over_the_memory_bus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: the README's command, two rounds, no broker.
    out = tmp_path / "out"
    rc = main(["run", str(QUICKSTART), "--broker", "memory", "--rounds", "2", "--out", str(out)])
    # Assert
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "round 2/2" in printed
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["participants"] == 10 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["success"] is True
    assert summary["broker"]["kind"] == "memory"
    assert (out / "model.msgpack").is_file()


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_quickstart_runs_through_the_embedded_broker(tmp_path: Path) -> None:
    # Execute: `fedbus run examples/quickstart.yaml` as a user types it (fewer rounds).
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedbus",
            "run",
            str(QUICKSTART),
            "--rounds",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=80,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    # Assert
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round 3/3" in proc.stdout
    rows = _rows(out)
    assert [r["participants"] for r in rows] == [10, 10, 10]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["broker"]["kind"] == "embedded"
    assert summary["broker"]["url"].startswith("mqtt://127.0.0.1:")

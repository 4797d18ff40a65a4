"""``fedbus run --resume`` for gossip: every peer restarts from its own checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedbus.cli import main
from fedbus.launch.gossip import run_gossip
from fedbus.nodes import read_checkpoint
from fedbus.nodes.peer_checkpoint import PEERS_DIR, read_peer_checkpoint
from fedbus.nodes.results import CHECKPOINT_FILE
from fedbus.topology import loads_topology

pytestmark = pytest.mark.timeout(120)

TEXT = """
name: gossip-resume
seed: 0
broker: memory
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: 0.5}}}}
model: {{kind: mlp, hidden: [16]}}
training: {{epochs: 1, batch_size: 16, lr: 0.05}}
protocol: {{kind: gossip, rounds: {rounds}, round_timeout_s: 5, join_timeout_s: 10{extra}}}
nodes: {{peers: {{count: 6}}, graph: {{kind: ring}}}}
"""


def rows(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


async def test_each_round_checkpoints_every_peer_and_the_run(tmp_path: Path) -> None:
    text = TEXT.format(rounds=4, extra="")
    result = await run_gossip(loads_topology(text), out=tmp_path, topology_text=text)
    assert result.success, result.reason
    checkpoint = read_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert (checkpoint.round, checkpoint.run) == (4, result.run_id)
    for i in range(6):
        peer = read_peer_checkpoint(tmp_path / PEERS_DIR, f"peer-{i}", run=result.run_id)
        assert peer is not None
        assert peer.round == 4
        assert set(peer.weights) == set(result.weights)
    # the run's model is the average of the peers' last models, as model.msgpack
    for name, value in result.weights.items():
        np.testing.assert_allclose(checkpoint.weights[name], value, rtol=1e-6)
    assert read_peer_checkpoint(tmp_path / PEERS_DIR, "peer-0", run="another run") is None


def test_resume_continues_the_run_from_the_peers_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a run of 3 rounds, as if stopped there, then the same file with 6
    out = tmp_path / "out"
    short, full = tmp_path / "short.yaml", tmp_path / "full.yaml"
    short.write_text(TEXT.format(rounds=3, extra=""))
    full.write_text(TEXT.format(rounds=6, extra=""))
    assert main(["run", str(short), "--out", str(out)]) == 0
    first = rows(out)
    run = read_checkpoint(out / CHECKPOINT_FILE).run
    before = read_peer_checkpoint(out / PEERS_DIR, "peer-2", run=run)
    assert before is not None
    assert before.round == 3
    # Execute
    assert main(["run", str(full), "--resume", str(out)]) == 0
    # Assert: rows 1-3 kept as they were, 4-6 added by the same run
    assert "resuming after round 3" in capsys.readouterr().out
    after = rows(out)
    assert [r["round"] for r in after] == [1, 2, 3, 4, 5, 6]
    assert after[:3] == first
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"] == run
    assert summary["rounds_completed"] == 6
    # the peers went on from their round-3 models, not from the initial one
    assert after[3]["accuracy"] > after[0]["accuracy"]
    assert after[3]["accuracy"] >= after[2]["accuracy"] - 0.05
    assert read_checkpoint(out / CHECKPOINT_FILE).round == 6


def test_push_sum_refuses_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(TEXT.format(rounds=2, extra=", mixing: push_sum"))
    (tmp_path / "out").mkdir()
    assert main(["run", str(path), "--resume", str(tmp_path / "out")]) == 2
    assert "push_sum" in capsys.readouterr().err

"""Attacks and defenses from YAML, run as whole federations over the in-process bus."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.cli import main
from fedbus.launch import run_federation
from fedbus.launch.build import build_data, client_trainer
from fedbus.launch.robustness import AttackPlan, Collusion
from fedbus.learning.trainers import NumpyTrainer
from fedbus.topology import Topology, loads_topology

pytestmark = pytest.mark.timeout(90)

DEFENSE = "  validators: [{kind: norm_outlier}, {kind: cosine_outlier, reference: median}]\n"


def yaml(*, rounds: int = 15, validators: str = "", attacks: str = "") -> str:
    """Ten digits clients, Dirichlet(0.5), all selected every round, over the memory bus."""
    return (
        "name: robust\nseed: 0\nbroker: memory\n"
        "data: {dataset: digits, partition: {kind: dirichlet, alpha: 0.5}}\n"
        "model: {kind: mlp, hidden: [32]}\n"
        f"protocol:\n  rounds: {rounds}\n  round_timeout_s: 20\n{validators}"
        "nodes: {server: server, clients: 10}\n" + (f"attacks:\n{attacks}" if attacks else "")
    )


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_accuracy(text: str, out: Path) -> float:
    result = asyncio.run(run_federation(loads_topology(text), out=out))
    assert result.server.success, result.server.reason
    accuracy = rows(out)[-1]["accuracy"]
    assert isinstance(accuracy, float)
    return accuracy


def test_sign_flip_breaks_fedavg_and_validators_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    attack = "  - {kind: sign_flip, fraction: 0.2}\n"
    defended = tmp_path / "defended.yaml"
    defended.write_text(yaml(validators=DEFENSE, attacks=attack))
    # Execute
    clean = final_accuracy(yaml(), tmp_path / "clean")
    attacked = final_accuracy(yaml(attacks=attack), tmp_path / "attacked")
    code = main(["run", str(defended), "--out", str(tmp_path / "d")])
    # Assert
    assert code == 0
    printed = capsys.readouterr().out
    assert "attack sign_flip(fraction=0.2, period=1, scale=-4.0) by client-1, client-2" in printed
    assert attacked < clean - 0.3, (clean, attacked)
    got = rows(tmp_path / "d")
    assert got[-1]["accuracy"] > clean - 0.05, (clean, got[-1]["accuracy"])
    for row in got:  # the two attackers' updates are turned away every round (an accepted
        # -4x update would undo the round), an honest outlier now and then
        assert sum(row["rejected"].values()) >= 2, row
        assert set(row["rejected"]) <= {"norm_outlier", "cosine_outlier"}
        assert row["participants"] + sum(row["rejected"].values()) == 10
    assert sum(sum(r["rejected"].values()) for r in got) <= 2 * len(got) + 3
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["attacks"][0]["nodes"] == ["client-1", "client-2"]
    assert summary["attacks"][0]["describe"].startswith("sign_flip(")
    assert [v["kind"] for v in summary["validators"]] == ["norm_outlier", "cosine_outlier"]


def test_label_flip_poisons_exactly_the_attackers_data() -> None:
    # Prepare
    topology = loads_topology(yaml(attacks="  - {kind: label_flip, fraction: 0.3}\n"))
    data = build_data(topology, Path())
    (chosen,) = topology.attackers()
    # Execute
    plan = AttackPlan(topology, data)
    # Assert
    assert len(chosen) == 3
    assert plan.attackers == dict.fromkeys(chosen, "label_flip")
    for cid, clean in data.train.items():
        poisoned = plan.poisoned_data(cid)
        hook = plan.client_attack(cid, client_trainer(topology, data, cid))
        if cid in chosen:
            assert poisoned is not None
            assert hook is not None
            np.testing.assert_array_equal(poisoned.y, 9 - clean.y)
            np.testing.assert_array_equal(poisoned.x, clean.x)
            assert isinstance(hook.poisoned, NumpyTrainer)  # the attacker trains on the poison
            assert hook.poisoned.train is not None
            np.testing.assert_array_equal(hook.poisoned.train.y, 9 - clean.y)
        else:
            assert poisoned is None
            assert hook is None


async def test_model_replacement_reports_backdoor_accuracy(tmp_path: Path) -> None:
    # Prepare
    attack = "  - {kind: model_replacement, nodes: [client-3], rounds: [8]}\n"
    # Execute
    result = await run_federation(loads_topology(yaml(rounds=8, attacks=attack)), out=tmp_path)
    # Assert
    assert result.server.success, result.server.reason
    got = rows(tmp_path)
    assert all(isinstance(r["backdoor_accuracy"], float) for r in got)
    assert got[6]["backdoor_accuracy"] < 0.3  # before the attack: the trigger means nothing
    assert got[7]["backdoor_accuracy"] > 0.8  # the replaced model obeys the trigger


async def test_backdoor_data_poisoning_reports_backdoor_accuracy(tmp_path: Path) -> None:
    attack = "  - {kind: backdoor, fraction: 0.2}\n"
    result = await run_federation(loads_topology(yaml(rounds=3, attacks=attack)), out=tmp_path)
    assert result.server.success, result.server.reason
    assert [type(r.get("backdoor_accuracy")) for r in rows(tmp_path)] == [float] * 3


async def test_clean_run_has_no_backdoor_column(tmp_path: Path) -> None:
    result = await run_federation(loads_topology(yaml(rounds=2)), out=tmp_path)
    assert result.server.success
    assert all("backdoor_accuracy" not in r for r in rows(tmp_path))
    assert "attacks" not in json.loads((tmp_path / "summary.json").read_text())


async def test_validation_accuracy_holds_out_part_of_the_test_split(tmp_path: Path) -> None:
    # Prepare
    gate = "  validators: [{kind: validation_accuracy, validation_fraction: 0.25, max_drop: 1.0}]\n"
    topology: Topology = loads_topology(yaml(rounds=2, validators=gate))
    # Execute
    result = await run_federation(topology, out=tmp_path)
    # Assert: max_drop 1.0 accepts everything, so the gate ran without rejecting
    assert result.server.success, result.server.reason
    assert all(r["rejected"] == {} and r["participants"] == 10 for r in rows(tmp_path))
    from fedbus.launch.robustness import server_defenses

    data = build_data(topology, Path())
    defenses = server_defenses(topology, data)
    assert defenses.validation is not None
    assert len(defenses.validation) + len(defenses.data.test) == len(data.test)
    assert len(defenses.validation) == round(0.25 * len(data.test))


async def test_collusion_shares_honest_updates_of_the_round() -> None:
    # Prepare
    together = Collusion(["a", "b"], wait_s=5.0)
    g = {"w": np.zeros(2)}
    # Execute
    got_a, got_b = await asyncio.gather(
        together.share(1, g, "a", {"w": np.ones(2)}, {"a", "b"}),
        together.share(1, g, "b", {"w": np.full(2, 2.0)}, {"a", "b"}),
    )
    alone = await Collusion(["a", "b"], wait_s=0.05).share(1, g, "a", {"w": np.ones(2)}, {"a"})
    # Assert
    assert [p["w"][0] for p in got_a] == [1.0, 2.0] == [p["w"][0] for p in got_b]
    assert len(alone) == 1


async def test_alie_attackers_collude_in_a_run(tmp_path: Path) -> None:
    attack = "  - {kind: alie, fraction: 0.2}\n"
    clean = await run_federation(loads_topology(yaml(rounds=3)), out=None)
    result = await run_federation(loads_topology(yaml(rounds=3, attacks=attack)), out=tmp_path)
    assert result.server.success, result.server.reason
    assert all(r["participants"] == 10 for r in rows(tmp_path))
    assert any(not np.array_equal(result.weights[k], clean.weights[k]) for k in clean.weights)

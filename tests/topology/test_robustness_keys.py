"""``protocol.validators`` and ``attacks`` as the topology reads them."""

from __future__ import annotations

import pytest

from fedbus.attacks import make_attack
from fedbus.topology import TopologyError, loads_topology
from fedbus.topology.robustness import AttackSpec, ValidatorSpec, assign_attackers

BASE = "name: r\ndata: {{}}\nprotocol:\n  rounds: 10\n{extra}nodes: {{server: s, clients: 20}}\n"


def test_reads_validators_and_attacks() -> None:
    t = loads_topology(
        BASE.format(
            extra="  validators: [norm_outlier, {kind: cosine_outlier, params: {reference: median}},"
            " {kind: validation_accuracy, max_drop: 0.1}]\n"
        )
        + "attacks:\n  - {kind: sign_flip, fraction: 0.2}\n"
        "  - {kind: model_replacement, nodes: [client-3], rounds: [5, 10]}\n"
        "  - {kind: gaussian, nodes: [client-4], every: 3, params: {std: 2.0}}\n"
    )
    v = t.protocol.validators
    assert [x.kind for x in v] == ["norm_outlier", "cosine_outlier", "validation_accuracy"]
    assert v[1].as_dict() == {"kind": "cosine_outlier", "reference": "median"}
    assert (v[0].fraction, v[2].fraction) == (0.0, 0.1)
    a = t.attacks
    assert [x.kind for x in a] == ["sign_flip", "model_replacement", "gaussian"]
    assert [a[1].active(r) for r in (4, 5, 10)] == [False, True, True]
    assert [a[2].active(r) for r in (1, 3, 6)] == [False, True, True]
    assert a[2].attack().params["std"] == 2.0
    drawn, replacing, noisy = t.attackers()
    assert len(drawn) == 4
    assert (replacing, noisy) == (("client-3",), ("client-4",))
    assert not {"client-3", "client-4"} & set(drawn)


def test_first_draw_matches_the_one_process_loop() -> None:
    pool = [f"client-{i}" for i in range(20)]
    (got,) = assign_attackers([AttackSpec(kind="alie", fraction=0.2)], pool, 7)
    assert list(got) == make_attack({"kind": "alie", "fraction": 0.2}).attackers(pool, 7)


def test_several_draws_are_disjoint_and_deterministic() -> None:
    pool = [f"c{i}" for i in range(10)]
    specs = [AttackSpec(kind="ipm", fraction=0.3), AttackSpec(kind="gaussian", fraction=0.3)]
    first, second = assign_attackers(specs, pool, 0)
    assert (len(first), len(second)) == (3, 3)
    assert not set(first) & set(second)
    assert assign_attackers(specs, pool, 0) == [first, second]


def test_specs_built_in_python_validate_themselves() -> None:
    with pytest.raises(TopologyError) as info:
        ValidatorSpec(kind="norm_outlier", params={"sigmas": -1})
    assert info.value.problems[0].path == "sigmas"
    with pytest.raises(TopologyError) as info:
        AttackSpec(kind="ipm", fraction=0.2, nodes=("a",), rounds=(0,))
    assert {p.path for p in info.value.problems} == {"fraction", "rounds[0]"}


def test_attacker_named_twice_across_attacks() -> None:
    text = BASE.format(extra="") + (
        "attacks:\n  - {kind: ipm, nodes: [client-1]}\n  - {kind: alie, nodes: [client-1]}\n"
    )
    with pytest.raises(TopologyError) as info:
        loads_topology(text)
    assert info.value.problems[0].path == "attacks[1].nodes[0]"
    assert "already attacks in attacks[0]" in info.value.problems[0].message

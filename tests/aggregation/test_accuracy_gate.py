"""The validation gate on real non-IID digits: marginal scoring keeps honest updates."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest

from fedbus.aggregation import AccuracyGate, AggregationError, ClientUpdate, make_validators
from fedbus.attacks import flip_labels, sign_flip
from fedbus.errors import ConfigError
from fedbus.learning import FitConfig, fit_seed, init_seed, make_trainer
from fedbus.learning.partition import build_federation_data
from fedbus.learning.trainer import Trainer

MODEL = {"kind": "mlp", "hidden": [32]}
FLIPPED, SIGNED = "client-13", "client-1"


def _trainer(train: Any, ev: Any) -> Trainer:
    return make_trainer(MODEL, train, ev, num_features=64, num_classes=10)


@functools.cache
def _round() -> tuple[dict[str, Any], list[ClientUpdate], Trainer]:
    """Round 6 of FedAvg over 20 Dirichlet(0.5) clients; client-13 flips labels, client-1 signs.

    The validation set is half the held-out split (180 digits), as in the
    default robust configuration.
    """
    ids = [f"client-{i}" for i in range(20)]
    data = build_federation_data("digits", {}, "dirichlet", {"alpha": 0.5}, ids,
                                 test_fraction=0.2, seed=0)  # fmt: skip
    validation = data.test.subset(np.arange(0, len(data.test), 2))
    t = {c: _trainer(data.train[c], None) for c in ids}
    g = t[ids[0]].initial_weights(init_seed(0))

    def fit(c: str, rnd: int, trainer: Trainer | None = None) -> ClientUpdate:
        out = (trainer or t[c]).fit(g, FitConfig(seed=fit_seed(0, rnd, c)))
        return ClientUpdate(sender=c, weights=out.weights, num_examples=len(data.train[c]))

    from fedbus.aggregation import FedAvg

    for rnd in range(1, 6):
        g = FedAvg().aggregate(g, [fit(c, rnd) for c in ids], round=rnd)
    ups = [fit(c, 6) for c in ids if c not in (FLIPPED, SIGNED)]
    ups.append(fit(FLIPPED, 6, _trainer(flip_labels(data.train[FLIPPED]), None)))
    honest_signed = fit(SIGNED, 6)
    ups.append(ClientUpdate(sender=SIGNED, weights=sign_flip(honest_signed.weights, g),
                            num_examples=honest_signed.num_examples))  # fmt: skip
    return g, ups, _trainer(None, validation)


def test_marginal_gate_accepts_honest_non_iid_updates_and_rejects_poisoned_ones() -> None:
    g, ups, validation = _round()
    gate = AccuracyGate(validation)
    verdict = gate.validate(g, ups, round=6)
    assert verdict.get(FLIPPED) == "validation_accuracy"
    assert verdict.get(SIGNED) == "validation_accuracy"
    honest_rejected = sorted(set(verdict) - {FLIPPED, SIGNED})
    assert len(honest_rejected) <= 1, (
        honest_rejected
    )  # 18 honest clients, two or three classes each
    assert gate.last_worsening[SIGNED] > gate.last_worsening[FLIPPED] > 0
    # The gate is fed the honest clients only: at most the one tail client goes.
    honest_only = [u for u in ups if u.sender not in (FLIPPED, SIGNED)]
    assert len(AccuracyGate(validation).validate(g, honest_only, round=6)) <= 1


def test_full_model_scoring_rejects_most_honest_non_iid_updates() -> None:
    # The old rule, kept as mode: full: each client's own model against the global one.
    g, ups, validation = _round()
    gate = AccuracyGate(validation, mode="full", max_drop=0.05)
    verdict = gate.validate(g, ups, round=6)
    honest = [u.sender for u in ups if u.sender not in (FLIPPED, SIGNED)]
    assert sum(s in verdict for s in honest) > len(honest) // 2
    assert all(gate.last_accuracy[s] < gate.last_accuracy[""] for s in verdict)


def test_gate_rules_and_parameters() -> None:
    def evaluate(weights: Any) -> Any:  # loss grows with distance from the optimum w = 1
        w = float(np.asarray(weights["w"])[0])
        return type("R", (), {"accuracy": 1.0 - abs(w - 1.0), "loss": (w - 1.0) ** 2})()

    def up(sender: str, value: float, n: int = 1) -> ClientUpdate:
        return ClientUpdate(sender=sender, weights={"w": np.array([value])}, num_examples=n)

    g = {"w": np.array([0.0])}
    # Deltas 0.9..1.1 help; -3 hurts. At weight 1/n each moves w by delta/n.
    ups = [up(f"h{i}", 0.9 + 0.05 * i) for i in range(5)] + [up("x", -3.0)]
    gate = AccuracyGate(evaluate)
    assert gate.validate(g, ups, round=1) == {"x": "validation_accuracy"}
    assert gate.last_worsening["x"] == pytest.approx((0.5 + 1.0) ** 2 - 1.0)
    # A non-finite update is rejected and does not blind the round's statistics.
    nan = AccuracyGate(evaluate).validate(g, [*ups, up("nan", float("nan"))], round=1)
    assert nan == {"x": "validation_accuracy", "nan": "validation_accuracy"}
    # A lone update: no round statistics, only the absolute rule applies.
    assert AccuracyGate(evaluate).validate(g, [up("x", -3.0)], round=1) == {}
    assert AccuracyGate(evaluate, max_drop=0.5).validate(g, [up("x", -3.0)], round=1) == {
        "x": "validation_accuracy"
    }
    # Accuracy as the metric, and a plain accuracy callable (no loss) falls back to it.
    acc_only = AccuracyGate(lambda w: 1.0 - abs(float(np.asarray(w["w"])[0]) - 1.0))
    assert acc_only.validate(g, ups, round=1) == {"x": "validation_accuracy"}
    with pytest.raises(ConfigError, match="loss"):
        AccuracyGate(lambda w: 0.5, metric="loss").validate(g, ups, round=1)
    with pytest.raises(ConfigError) as info:
        make_validators([{"kind": "validation_accuracy", "evaluate": evaluate, "mode": "x"}])
    assert info.value.path == "protocol.validators[0].mode"


# -- history: evidence over rounds -------------------------------------------------------


def _linear(weights: Any) -> Any:
    """Loss = the weight itself: a marginal score is the update's value over n (n = 12 here)."""
    w = float(np.asarray(weights["w"])[0])
    return type("R", (), {"accuracy": 0.5, "loss": w})()


HONEST = [f"h{i:02d}" for i in range(10)]


def _history_round(rnd: int) -> list[ClientUpdate]:
    """One round: ten honest clients, a noisy honest one and a consistent flipper.

    The honest clients have persistent non-IID biases (-0.5..0.5) plus round
    noise; ``noisy`` is honest, usually helps a lot and hurts every third
    round; ``flip`` always hurts, by a bit more than the honest tail.
    """
    rng = np.random.default_rng(rnd)
    scores = {
        c: b + rng.normal(0.0, 0.5) for c, b in zip(HONEST, np.linspace(-0.5, 0.5, 10), strict=True)
    }
    scores["noisy"] = 2.0 if rnd % 3 == 0 else -3.0
    scores["flip"] = 1.2 + rng.normal(0.0, 0.3)
    return [
        ClientUpdate(sender=c, weights={"w": np.array([v])}, num_examples=1)
        for c, v in scores.items()
    ]


def _verdicts(gate: AccuracyGate, rounds: range) -> list[dict[str, str]]:
    g = {"w": np.array([0.0])}
    return [gate.validate(g, _history_round(r), round=r) for r in rounds]


def test_history_rejects_a_consistent_flipper_and_spares_a_noisy_honest_client() -> None:
    rounds = range(1, 21)
    # Per round only: the flipper slips through in some rounds, and the noisy client
    # is rejected in every round it hurts.
    plain = _verdicts(AccuracyGate(_linear), rounds)
    assert any("flip" not in v for v in plain)
    assert [r for r, v in zip(rounds, plain, strict=True) if "noisy" in v] == list(rounds[2::3])
    # With history: the flipper goes in every round, the noisy client (its mean below
    # the round's median) in none, and no more honest updates go than before.
    gate = AccuracyGate(_linear, history=1.5, history_min_rounds=3)
    verdicts = _verdicts(gate, rounds)
    assert all("flip" in v for v in verdicts)
    assert not any("noisy" in v for v in verdicts)

    def honest(run: list[dict[str, str]]) -> int:
        return sum(len(set(v) & set(HONEST)) for v in run)

    assert honest(verdicts) <= honest(plain)
    assert gate.last_history["flip"] > 1.5 > max(gate.last_history[c] for c in HONEST)
    assert gate.last_history["noisy"] < 0


def test_history_is_order_independent_and_survives_a_checkpoint() -> None:
    g = {"w": np.array([0.0])}
    ordered = AccuracyGate(_linear, history=1.5)
    shuffled = AccuracyGate(_linear, history=1.5)
    rng = np.random.default_rng(7)
    for rnd in range(1, 7):
        ups = _history_round(rnd)
        mixed = [ups[i] for i in rng.permutation(len(ups))]
        assert ordered.validate(g, ups, round=rnd) == shuffled.validate(g, mixed, round=rnd)
    state = ordered.state_dict()
    assert state.keys() == shuffled.state_dict().keys()
    assert all(np.array_equal(v, shuffled.state_dict()[k]) for k, v in state.items())
    assert state["history/flip"][1] == 6.0
    # A gate restored from the state decides the next rounds as the original does; a
    # fresh gate, knowing nothing of the noisy client, rejects it when it next hurts.
    restored = AccuracyGate(_linear, history=1.5)
    restored.load_state_dict(state)
    later = range(9, 11)
    expected = _verdicts(ordered, later)
    assert _verdicts(restored, later) == expected
    assert "noisy" not in expected[0]
    assert "noisy" in _verdicts(AccuracyGate(_linear, history=1.5), later)[0]
    with pytest.raises(AggregationError, match="unexpected entry"):
        restored.load_state_dict({"control/w": np.zeros(2)})


def test_history_parameters_are_checked() -> None:
    with pytest.raises(ConfigError) as info:
        make_validators([{"kind": "validation_accuracy", "evaluate": _linear, "history": 0}])
    assert info.value.path == "protocol.validators[0].history"
    with pytest.raises(ConfigError, match="marginal"):
        AccuracyGate(_linear, mode="full", history=1.5)
    with pytest.raises(ConfigError):
        AccuracyGate(_linear, history=1.5, history_min_rounds=0)

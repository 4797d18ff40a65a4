"""Update validators: norm and cosine outliers, the validation-accuracy gate, composition."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedbus.aggregation import (
    AccuracyGate,
    ClientUpdate,
    CosineOutlier,
    NormOutlier,
    ValidatorChain,
    make_validators,
)
from fedbus.errors import ConfigError


def up(sender: str, value: Any) -> ClientUpdate:
    return ClientUpdate(sender=sender, weights={"w": np.asarray(value, np.float64)}, num_examples=1)


def honest(n: int, seed: int = 0) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    return [up(f"h{i:02d}", np.array([1.0, 1.0, 0.0]) + rng.normal(0, 0.1, 3)) for i in range(n)]


def test_norm_outlier_catches_a_20_percent_coalition_and_free_riders() -> None:
    g = {"w": np.zeros(3)}
    ups = (
        honest(16) + [up(f"x{i}", [40.0, 40.0, 0.0]) for i in range(3)] + [up("free", [0.0, 0, 0])]
    )
    verdict = NormOutlier().validate(g, ups, round=1)
    assert verdict == {"free": "norm_outlier", "x0": "norm_outlier", "x1": "norm_outlier",
                       "x2": "norm_outlier"}  # fmt: skip
    # With mean and standard deviation, 4 identical outliers out of 20 hide (z = 2).
    classical = NormOutlier(robust=False).validate(g, honest(16) + [up(f"x{i}", [40.0, 40.0, 0])
                                                                   for i in range(4)], round=1)  # fmt: skip
    assert classical == {}
    assert NormOutlier().validate(g, honest(2), round=1) == {}


def test_cosine_outlier_rejects_flipped_updates_against_mean_median_and_previous() -> None:
    g = {"w": np.zeros(3)}
    ups = honest(16) + [up(f"x{i}", [-4.0, -4.0, 0.0]) for i in range(4)]
    verdict = CosineOutlier(reference="median").validate(g, ups, round=1)
    assert verdict == {f"x{i}": "cosine_outlier" for i in range(4)}
    # A -4x coalition cancels the mean; a -1x one only drags it.
    mild = honest(16) + [up(f"x{i}", [-1.0, -1.0, 0.0]) for i in range(4)]
    assert sorted(CosineOutlier(reference="mean").validate(g, mild, round=1)) == [
        "x0",
        "x1",
        "x2",
        "x3",
    ]
    prev = CosineOutlier(reference="previous", min_cosine=0.0)
    assert prev.validate({"w": np.zeros(3)}, ups, round=1) == {}  # no previous step yet
    moved = {"w": np.array([1.0, 1.0, 0.0])}
    shifted = [up(u.sender, np.asarray(u.weights["w"]) + 1.0) for u in ups]
    assert sorted(prev.validate(moved, shifted, round=2)) == ["x0", "x1", "x2", "x3"]


def test_accuracy_gate_rejects_updates_that_lower_validation_accuracy() -> None:
    def evaluate(weights: Any) -> float:  # "accuracy" falls with distance from the optimum 1
        return float(1.0 - abs(np.asarray(weights["w"])[0] - 1.0))

    gate = AccuracyGate(evaluate, mode="full", max_drop=0.05)  # each client's own model
    g = {"w": np.array([0.9], np.float32)}
    verdict = gate.validate(g, [up("a", [0.95]), up("b", [0.5]), up("c", [0.87])], round=1)
    assert verdict == {"b": "validation_accuracy"}
    assert gate.last_accuracy["b"] == pytest.approx(0.5)

    class Trainer:
        def evaluate(self, weights: Any) -> Any:
            return type("R", (), {"accuracy": evaluate(weights)})()

    assert AccuracyGate(Trainer(), mode="full").validate(g, [up("b", [0.5])], round=1) == {
        "b": "validation_accuracy"
    }
    with pytest.raises(ConfigError, match="evaluate"):
        AccuracyGate(3)


def test_chain_reports_the_first_reason_and_make_validators_names_the_index() -> None:
    g = {"w": np.zeros(3)}
    ups = honest(16) + [up(f"x{i}", [-40.0, -40.0, 0.0]) for i in range(4)]
    chain = ValidatorChain(make_validators(["norm_outlier", {"kind": "cosine_outlier",
                                                            "params": {"reference": "median"}}]))  # fmt: skip
    verdict = chain.validate(g, ups, round=1)
    assert verdict == {f"x{i}": "norm_outlier" for i in range(4)}
    with pytest.raises(ConfigError) as info:
        make_validators(["norm_outlier", {"kind": "cosine_outlier", "reference": "nope"}])
    assert info.value.path == "protocol.validators[1].reference"
    with pytest.raises(ConfigError) as info:
        make_validators([{"kind": "bogus"}])
    assert info.value.path == "protocol.validators[0].kind"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("make", [NormOutlier, lambda: CosineOutlier(reference="median")])
def test_outlier_checks_reject_non_finite_updates_and_keep_their_statistics(
    bad: float, make: Any
) -> None:
    # A non-finite update would pass any comparison with NaN; it must not, and it must
    # not blind the round's statistics either (the honest and the boosted stay judged).
    g = {"w": np.zeros(3)}
    ups = [*honest(16), up("nan", [bad, 1.0, 0.0]), up("boost", [-40.0, -40.0, 0.0])]
    validator = make()
    assert set(validator.validate(g, ups, round=1)) == {"nan", "boost"}
    all_bad = [up("a", [bad, 0, 0]), up("b", [0, bad, 0]), up("c", [bad] * 3)]
    assert set(make().validate(g, all_bad, round=1)) == {"a", "b", "c"}


def test_validator_state_covers_the_stateful_validators_of_a_list() -> None:
    from fedbus.aggregation import AggregationError
    from fedbus.aggregation.validators import load_validator_state, validator_state

    def loss(weights: Any) -> Any:  # the marginal score is the first coordinate
        return type("R", (), {"accuracy": 0.5, "loss": float(np.asarray(weights["w"])[0])})()

    def build() -> list[Any]:
        return make_validators([{"kind": "norm_outlier"},
                                {"kind": "validation_accuracy", "evaluate": loss, "history": 1.5}])  # fmt: skip

    g = {"w": np.zeros(3)}
    first = build()
    chain = ValidatorChain(first)
    for rnd in range(1, 4):
        chain.validate(g, [*honest(8, seed=rnd), up("x", [1.1, 0.9, 0.0])], round=rnd)
    state = chain.state_dict()
    assert state.keys() == validator_state(first).keys()
    assert len(state) == 9  # the gate's nine senders; norm_outlier keeps nothing
    assert all(k.startswith("1/history/") for k in state)
    assert np.array_equal(state["1/history/x"][1:], [3.0])
    again = build()
    load_validator_state(again, state)
    assert validator_state(again).keys() == state.keys()
    assert all(np.array_equal(validator_state(again)[k], v) for k, v in state.items())
    round4 = [*honest(8, seed=4), up("x", [1.1, 0.9, 0.0])]
    assert ValidatorChain(again).validate(g, round4, round=4) == chain.validate(g, round4, round=4)
    for bad in ({"0/history/x": np.zeros(2)}, {"7/history/x": np.zeros(2)}, {"x": np.zeros(2)}):
        with pytest.raises(AggregationError, match="no stateful validator"):
            load_validator_state(build(), bad)

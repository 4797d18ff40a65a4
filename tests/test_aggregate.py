"""FedAvg math, order independence, delta encoding, the registry and factories."""

from __future__ import annotations

import random
import sys
import types
from typing import Any

import numpy as np
import pytest

from fedbus.aggregation import (
    AggregationError,
    Aggregator,
    ClientUpdate,
    FedAvg,
    make_aggregator,
    register_aggregator,
    sorted_updates,
    weighted_sum,
)
from fedbus.aggregation.registry import AGGREGATORS
from fedbus.errors import ConfigError


def up(sender: str, n: int, value: Any, encoding: str = "dense") -> ClientUpdate:
    return ClientUpdate(sender=sender, weights={"w": np.asarray(value)}, num_examples=n,
                        encoding=encoding)  # fmt: skip


def test_fedavg_weights_by_num_examples_and_keeps_dtype() -> None:
    g = {"w": np.zeros(3, np.float32), "step": np.zeros((), np.int64), "m": np.zeros(1, bool)}
    ups = [
        ClientUpdate(sender="a", weights={"w": np.ones(3, np.float32), "step": np.array(2),
                     "m": np.array([True])}, num_examples=1),
        ClientUpdate(sender="b", weights={"w": np.full(3, 4.0, np.float32), "step": np.array(4),
                     "m": np.array([False])}, num_examples=3),
    ]  # fmt: skip
    out = FedAvg().aggregate(g, ups, round=1)
    np.testing.assert_array_equal(out["w"], np.full(3, 3.25, np.float32))
    assert out["w"].dtype == np.float32
    assert out["step"] == 4
    assert out["step"].dtype == np.int64
    assert out["m"].tolist() == [False]
    f64 = FedAvg().aggregate({"w": np.zeros(1)}, [up("a", 1, [2.0])], round=1)
    assert f64["w"].dtype == np.float64


def test_delta_updates_add_to_the_global_model() -> None:
    g = {"w": np.full(2, 10.0, np.float32)}
    out = FedAvg().aggregate(g, [up("a", 1, np.full(2, 1.0, np.float32), "delta"),
                                 up("b", 3, np.full(2, 3.0, np.float32), "delta")], round=1)  # fmt: skip
    np.testing.assert_allclose(out["w"], 10.0 + 2.5)
    mixed = FedAvg().aggregate(g, [up("a", 1, np.full(2, 2.0, np.float32), "delta"),
                                   up("b", 1, np.full(2, 4.0, np.float32))], round=1)  # fmt: skip
    np.testing.assert_allclose(mixed["w"], (12.0 + 4.0) / 2)


def test_bit_identical_over_1000_arrival_orders() -> None:
    rng = np.random.default_rng(0)
    g = {"w": rng.standard_normal((7, 33)).astype(np.float32), "b": np.zeros(5, np.float32)}
    ups = [
        ClientUpdate(sender=f"c{i:02d}", num_examples=int(rng.integers(1, 500)),
                     weights={"w": (rng.standard_normal((7, 33)) * 10.0 ** rng.integers(-3, 3)).astype(np.float32),
                              "b": rng.standard_normal(5).astype(np.float32)})
        for i in range(25)
    ]  # fmt: skip
    agg = FedAvg()
    reference = agg.aggregate(g, ups, round=1)
    shuffler = random.Random(1)
    for _ in range(1000):
        order = ups[:]
        shuffler.shuffle(order)
        out = agg.aggregate(g, order, round=1)
        for name in g:
            assert out[name].tobytes() == reference[name].tobytes()


def test_weighted_sum_does_not_depend_on_the_block_size() -> None:
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal(1000).astype(np.float32) for _ in range(5)]
    coeffs = [3, 1, 4, 1, 5]
    whole = weighted_sum(arrays, coeffs)
    assert weighted_sum(arrays, coeffs, block=7).tobytes() == whole.tobytes()
    expected = sum(
        np.float64(c) * a.astype(np.float64) for c, a in zip(coeffs, arrays, strict=True)
    )
    np.testing.assert_allclose(whole, expected, rtol=1e-12)


def test_fedavg_refuses_what_it_cannot_average() -> None:
    g = {"w": np.zeros(1)}
    with pytest.raises(AggregationError, match="at least one"):
        FedAvg().aggregate(g, [], round=1)
    with pytest.raises(AggregationError, match="positive total"):
        FedAvg().aggregate(g, [up("a", 0, [1.0])], round=1)
    with pytest.raises(AggregationError, match="encoding"):
        FedAvg().aggregate(g, [up("a", 1, [1.0], "sparse")], round=1)
    with pytest.raises(AggregationError, match="two updates"):
        sorted_updates([up("a", 1, [1.0]), up("a", 2, [1.0])])


def test_fedavg_state_round_trips_and_rejects_foreign_state() -> None:
    agg = FedAvg()
    assert agg.state_dict() == {}
    agg.load_state_dict({})
    with pytest.raises(AggregationError, match="no state"):
        agg.load_state_dict({"m": np.zeros(1)})


def test_make_aggregator_accepts_names_kinds_factories_and_instances() -> None:
    assert isinstance(make_aggregator("fedavg"), FedAvg)
    assert isinstance(make_aggregator({"kind": "fedavg"}), FedAvg)
    assert isinstance(make_aggregator({"kind": "fedavg", "params": {}}), FedAvg)
    mine = FedAvg()
    assert make_aggregator(mine) is mine
    module = types.ModuleType("fedbus_test_factories")
    module.make = lambda scale=1: FedAvg()  # type: ignore[attr-defined]
    module.bad = lambda: object()  # type: ignore[attr-defined]
    module.value = 3  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        assert isinstance(
            make_aggregator({"factory": "fedbus_test_factories:make", "scale": 2}), Aggregator
        )
        for spec, match in [
            ({"factory": "fedbus_test_factories:bad"}, "not an Aggregator"),
            ({"factory": "fedbus_test_factories:value"}, "not a callable"),
            ({"factory": "fedbus_test_factories:missing"}, "not a callable"),
            ({"factory": "no_such_module_xyz:f"}, "cannot import"),
            ({"factory": "no-colon"}, "pkg.mod:fn"),
            ({"factory": "fedbus_test_factories:make", "nope": 1}, "cannot build"),
        ]:
            with pytest.raises(ConfigError, match=match) as info:
                make_aggregator(spec)
            assert info.value.path is not None
            assert info.value.path.startswith("protocol.aggregator")
    finally:
        del sys.modules[module.__name__]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("krum-ish", "unknown aggregator 'krum-ish'; known: bulyan, fedadagrad"),
        (3, "expected a name or a mapping"),
        ({}, "exactly one of kind or factory"),
        ({"kind": "fedavg", "factory": "a:b"}, "exactly one"),
        ({"kind": 1}, "kind must be a string"),
        ({"kind": "fedavg", "params": 1}, "params must be a mapping"),
        ({"kind": "fedavg", "x": 1, "params": {"x": 2}}, "given twice"),
        ({"kind": "fedavg", "beta": 0.1}, "cannot build aggregator 'fedavg'"),
    ],
)
def test_make_aggregator_errors_name_the_path(spec: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        make_aggregator(spec)
    assert str(info.value).startswith("protocol.aggregator")


def test_register_aggregator_adds_names_once() -> None:
    @register_aggregator("test-mean")
    def build() -> FedAvg:
        return FedAvg()

    try:
        assert isinstance(make_aggregator("test-mean"), FedAvg)
        with pytest.raises(ConfigError, match="already registered"):
            register_aggregator("test-mean")(build)
    finally:
        del AGGREGATORS["test-mean"]


def test_config_errors_from_a_factory_pass_through() -> None:
    def strict(**kw: Any) -> FedAvg:
        raise ConfigError("f must be below n/2", path="protocol.aggregator.f")

    AGGREGATORS["test-strict"] = strict
    try:
        with pytest.raises(ConfigError, match="f must be below"):
            make_aggregator("test-strict")
    finally:
        del AGGREGATORS["test-strict"]

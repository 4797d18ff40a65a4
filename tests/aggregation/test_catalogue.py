"""Math, bounds, parameters and arrival-order independence of every aggregator."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from fedbus.aggregation import (
    AggregationError,
    Bulyan,
    ClientUpdate,
    CoordinateMedian,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedNova,
    GeometricMedian,
    Krum,
    MultiKrum,
    NormClipping,
    QFedAvg,
    TrimmedMean,
    make_aggregator,
)
from fedbus.errors import ConfigError

SPECS: list[Any] = [
    "fedavg",
    "median",
    {"kind": "trimmed_mean", "beta": 0.2},
    {"kind": "krum", "f": 2},
    {"kind": "multi_krum", "f": 2, "m": 4},
    {"kind": "bulyan", "f": 1},
    {"kind": "geometric_median", "max_iter": 5},
    {"kind": "norm_clipping", "max_norm": 0.5},
    {"kind": "norm_clipping", "inner": "median"},
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fednova",
    "qfedavg",
    "mifa",
    {"kind": "mifa", "max_staleness": 0, "server_lr": 0.5, "weighting": "uniform"},
]


def one(value: Any) -> dict[str, np.ndarray[Any, Any]]:
    return {"w": np.asarray(value, dtype=np.float64)}


def up(sender: str, value: Any, n: int = 1, **metrics: float) -> ClientUpdate:
    return ClientUpdate(sender=sender, weights=one(value), num_examples=n, metrics=metrics)


def random_round(seed: int, n: int = 9) -> tuple[dict[str, Any], list[ClientUpdate]]:
    rng = np.random.default_rng(seed)
    g = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.zeros(2, np.float32)}
    ups = []
    for i in range(n):
        delta = i % 3 == 0
        w = {k: (rng.standard_normal(v.shape) * 0.3 + (0 if delta else v)).astype(np.float32)
             for k, v in g.items()}  # fmt: skip
        ups.append(ClientUpdate(sender=f"c{i}", weights=w, num_examples=int(rng.integers(1, 50)),
                                encoding="delta" if delta else "dense",
                                metrics={"local_steps": float(rng.integers(1, 9)),
                                         "loss": float(rng.uniform(0.1, 2.0))}))  # fmt: skip
    return g, ups


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_bit_identical_over_1000_arrival_orders(spec: Any) -> None:
    g, ups = random_round(1)
    reference = make_aggregator(spec).aggregate(g, ups, round=1)
    shuffler = random.Random(2)
    for _ in range(1000):
        order = ups[:]
        shuffler.shuffle(order)
        out = make_aggregator(spec).aggregate(g, order, round=1)
        for name in g:
            assert out[name].dtype == g[name].dtype
            assert out[name].tobytes() == reference[name].tobytes()


def test_median_and_trimmed_mean_ignore_a_minority_of_huge_values() -> None:
    g = one([0.0])
    ups = [up("a", [1.0]), up("b", [2.0]), up("c", [3.0]), up("d", [1e9]), up("e", [-1e9])]
    assert CoordinateMedian().aggregate(g, ups, round=1)["w"].tolist() == [2.0]
    assert TrimmedMean(beta=0.2).aggregate(g, ups, round=1)["w"].tolist() == [2.0]
    assert TrimmedMean(beta=0.0).aggregate(g, ups[:3], round=1)["w"].tolist() == [2.0]


def test_delta_updates_are_read_as_global_plus_delta() -> None:
    g = one([10.0])
    ups = [ClientUpdate(sender=s, weights=one([v]), num_examples=1, encoding="delta")
           for s, v in [("a", 1.0), ("b", 2.0), ("c", 30.0)]]  # fmt: skip
    assert CoordinateMedian().aggregate(g, ups, round=1)["w"].tolist() == [12.0]


def test_krum_picks_the_cluster_and_breaks_ties_by_sender() -> None:
    g = one([0.0, 0.0])
    ups = [up("a", [1.0, 1.0]), up("b", [1.0, 1.0]), up("c", [1.1, 1.0]), up("d", [1.0, 1.1]),
           up("e", [50.0, -50.0]), up("f", [1.05, 1.05]), up("g", [-40.0, 9.0])]  # fmt: skip
    krum = Krum(f=2)
    assert krum.aggregate(g, ups, round=1)["w"].tolist() == [1.0, 1.0]
    assert krum.last_selected == ["a"]  # a and b tie; the earlier sender wins
    multi = MultiKrum(f=2)
    multi.aggregate(g, ups, round=1)
    assert multi.last_selected == ["a", "b", "c", "d", "f"]
    with pytest.raises(AggregationError, match=r"needs n >= 2f\+3 = 7"):
        Krum(f=2).aggregate(g, ups[:6], round=1)
    with pytest.raises(AggregationError, match="m=9"):
        MultiKrum(f=1, m=9).aggregate(g, ups, round=1)


def test_bulyan_refuses_below_4f_plus_3_and_filters_outliers() -> None:
    g = one([0.0])
    with pytest.raises(
        AggregationError, match=r"bulyan with f=2 needs n >= 4f\+3 = 11 updates, got 10"
    ):
        Bulyan(f=2).aggregate(g, [up(f"c{i}", [float(i)]) for i in range(10)], round=1)
    with pytest.raises(ConfigError, match=r"protocol\.aggregator\.f"):
        Bulyan.check_bound(10, 2)
    Bulyan.check_bound(11, 2)
    ups = [up(f"h{i}", [1.0 + 0.01 * i]) for i in range(9)] + [up("x1", [1e6]), up("x2", [-1e6])]
    out = Bulyan(f=2).aggregate(g, ups, round=1)["w"][0]
    assert 1.0 <= out <= 1.08


def test_geometric_median_is_robust_and_bounded() -> None:
    g = one([0.0, 0.0])
    ups = [up("a", [0.0, 0.0]), up("b", [1.0, 0.0]), up("c", [0.0, 1.0]), up("z", [1e6, 1e6])]
    gm = GeometricMedian(max_iter=200, tol=0.0)
    out = gm.aggregate(g, ups, round=1)["w"]
    assert np.all(np.abs(out) < 1.0)
    capped = GeometricMedian(max_iter=2, tol=0.0)
    capped.aggregate(g, ups, round=1)
    assert capped.last_iterations == 2


def test_norm_clipping_bounds_each_delta_then_averages() -> None:
    g = one([1.0, 1.0])
    ups = [up("a", [4.0, 5.0]), up("b", [1.0, 1.5])]  # deltas of norm 5 and 0.5
    clip = NormClipping(max_norm=1.0)
    out = clip.aggregate(g, ups, round=1)["w"]
    np.testing.assert_allclose(out, [1.0 + (0.6 + 0.0) / 2, 1.0 + (0.8 + 0.5) / 2])
    assert clip.last_clipped == ["a"]
    adaptive = NormClipping()  # bound: twice the median norm (2.0)
    adaptive.aggregate(g, [*ups, up("c", [1.0, 3.0])], round=1)
    assert adaptive.last_bound == 4.0
    assert adaptive.last_clipped == ["a"]
    tight = NormClipping(multiplier=1.0)
    tight.aggregate(g, [*ups, up("c", [1.0, 3.0])], round=1)
    assert (tight.last_bound, tight.last_clipped) == (2.0, ["a"])


def test_fedavgm_without_momentum_is_fedavg_and_momentum_accumulates() -> None:
    g = {"w": np.zeros(2, np.float32)}
    ups = [up("a", [1.0, 2.0], 1), up("b", [3.0, 4.0], 3)]
    plain = FedAvg().aggregate(g, ups, round=1)
    np.testing.assert_array_equal(FedAvgM(momentum=0.0).aggregate(g, ups, round=1)["w"], plain["w"])
    m = FedAvgM(momentum=0.5)
    first = m.aggregate(g, ups, round=1)
    second = m.aggregate(first, [up("a", first["w"]), up("b", first["w"])], round=2)["w"]
    np.testing.assert_allclose(
        second, first["w"] * 1.5
    )  # zero pseudo-gradient, half the momentum left


def test_fedadam_checkpoint_resume_matches_an_uninterrupted_run() -> None:
    g, ups = random_round(3)
    straight = FedAdam()
    w1 = straight.aggregate(g, ups, round=1)
    w2 = straight.aggregate(w1, ups, round=2)
    first = FedAdam()
    w1b = first.aggregate(g, ups, round=1)
    state = first.state_dict()
    assert {"step", "m/w", "v/w", "m/b", "v/b"} <= set(state)
    resumed = FedAdam()
    resumed.load_state_dict(state)
    w2b = resumed.aggregate(w1b, ups, round=2)
    for name in g:
        assert w2b[name].tobytes() == w2[name].tobytes()
    with pytest.raises(AggregationError, match="cannot load"):
        FedAdam().load_state_dict({"x/w": np.zeros(1)})


def test_fedadam_first_step_follows_reddi_et_al() -> None:
    g = one([0.0])
    out = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3).aggregate(
        g, [up("a", [2.0])], round=1
    )
    m, v = 0.1 * 2.0, 0.99 * 1e-6 + 0.01 * 4.0
    np.testing.assert_allclose(out["w"], [0.1 * m / (np.sqrt(v) + 1e-3)])


def test_fednova_normalizes_by_local_steps() -> None:
    g = one([0.0])
    ups = [up("a", [4.0], 1, local_steps=4.0), up("b", [1.0], 1, local_steps=1.0)]
    # tau_eff = 2.5; normalized directions 1 and 1 -> 2.5, where FedAvg gives 2.5 too...
    np.testing.assert_allclose(FedNova().aggregate(g, ups, round=1)["w"], [2.5])
    ups = [up("a", [4.0], 1, local_steps=8.0), up("b", [1.0], 1, local_steps=1.0)]
    # directions 0.5 and 1 -> mean 0.75 times tau_eff 4.5 = 3.375 (FedAvg: 2.5)
    np.testing.assert_allclose(FedNova().aggregate(g, ups, round=1)["w"], [3.375])
    with pytest.raises(AggregationError, match=r"'local_steps'.*b sent None"):
        FedNova().aggregate(g, [up("a", [1.0], 1, local_steps=2.0), up("b", [1.0])], round=1)


def test_qfedavg_with_q_zero_is_the_unweighted_mean() -> None:
    g = one([1.0])
    ups = [up("a", [3.0], 5, loss=0.5), up("b", [0.0], 1, loss=2.0)]
    np.testing.assert_allclose(QFedAvg(q=0.0).aggregate(g, ups, round=1)["w"], [1.5])
    fair = QFedAvg(q=2.0, client_lr=1.0).aggregate(g, ups, round=1)["w"][0]
    assert fair < 1.5  # the high-loss client b pulls harder
    with pytest.raises(AggregationError, match="'loss'"):
        QFedAvg().aggregate(g, [up("a", [1.0])], round=1)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"kind": "trimmed_mean", "beta": 0.5}, "protocol.aggregator.beta"),
        ({"kind": "krum", "f": -1}, "protocol.aggregator.f"),
        ({"kind": "multi_krum", "m": 0}, "protocol.aggregator.m"),
        ({"kind": "bulyan", "f": 1.5}, "protocol.aggregator.f"),
        ({"kind": "geometric_median", "max_iter": 0}, "protocol.aggregator.max_iter"),
        ({"kind": "norm_clipping", "max_norm": 0}, "protocol.aggregator.max_norm"),
        ({"kind": "norm_clipping", "inner": "nope"}, "protocol.aggregator.inner"),
        ({"kind": "fedadam", "beta_2": 1.0}, "protocol.aggregator.beta_2"),
        ({"kind": "fedavgm", "momentum": -0.1}, "protocol.aggregator.momentum"),
        ({"kind": "qfedavg", "q": -1}, "protocol.aggregator.q"),
        ({"kind": "median", "beta": 0.1}, "protocol.aggregator"),
    ],
)
def test_bad_parameters_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_aggregator(spec)
    assert info.value.path == field


def test_stateless_aggregators_refuse_foreign_state() -> None:
    for agg in (CoordinateMedian(), TrimmedMean(), Krum(), Bulyan(), GeometricMedian()):
        assert agg.state_dict() == {}
        agg.load_state_dict({})
        with pytest.raises(AggregationError, match="no state"):
            agg.load_state_dict({"m": np.zeros(1)})

"""MIFA: stale updates standing in for dropped clients, the staleness bound, state, order."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from fedbus.aggregation import (
    DELTA,
    AggregationError,
    ClientUpdate,
    FedAvg,
    Mifa,
    make_aggregator,
)
from fedbus.errors import ConfigError

Arr = np.ndarray[Any, Any]


def model(*values: float) -> dict[str, Arr]:
    return {"w": np.array(values, np.float32)}


def dense(sender: str, *values: float, n: int = 1) -> ClientUpdate:
    return ClientUpdate(sender=sender, weights=model(*values), num_examples=n)


def delta(sender: str, *values: float, n: int = 1) -> ClientUpdate:
    return ClientUpdate(sender=sender, weights=model(*values), num_examples=n, encoding=DELTA)


def test_dropout_transcript_stale_updates_stand_in() -> None:
    agg = Mifa()
    # Round 1: everyone answers; deltas a +1, b +2, c +6 with n 1, 1, 2 -> mean +3.75.
    x1 = agg.aggregate(model(0.0), [dense("a", 1.0), dense("b", 2.0), dense("c", 6.0, n=2)],
                       round=1)  # fmt: skip
    assert x1["w"].tolist() == [3.75]
    assert agg.last_stand_ins == []
    # Round 2: only a answers (delta -1); b's +2 and c's +6 stand in: (-1 + 2 + 12) / 4.
    x2 = agg.aggregate(x1, [dense("a", 2.75)], round=2)
    assert x2["w"].tolist() == [3.75 + 13 / 4]
    assert agg.last_stand_ins == ["b", "c"]
    # FedAvg on the same round moves by a's delta alone.
    assert FedAvg().aggregate(x1, [dense("a", 2.75)], round=2)["w"].tolist() == [2.75]
    # Round 3: c comes back with a new delta, which replaces its stored one.
    x3 = agg.aggregate(x2, [delta("c", -4.0, n=2)], round=3)
    assert x3["w"].tolist() == [x2["w"][0] + (-1 + 2 - 8) / 4]
    assert agg.last_stand_ins == ["a", "b"]
    assert agg.stored_senders() == ["a", "b", "c"]


def test_dense_and_delta_encodings_store_the_same_delta() -> None:
    g = model(1.0, -2.0)
    as_dense = Mifa()
    as_delta = Mifa()
    out_dense = as_dense.aggregate(g, [dense("a", 1.5, -1.0, n=3), dense("b", 0.0, 0.0)],
                                   round=1)  # fmt: skip
    out_delta = as_delta.aggregate(g, [delta("a", 0.5, 1.0, n=3), delta("b", -1.0, 2.0)],
                                   round=1)  # fmt: skip
    assert out_dense["w"].tobytes() == out_delta["w"].tobytes()
    for key, arr in as_dense.state_dict().items():
        assert as_delta.state_dict()[key].tobytes() == arr.tobytes()
    # ...and with everyone present, MIFA is FedAvg (up to rounding of the delta form).
    mixed = [dense("a", 1.5, -1.0, n=3), delta("b", -1.0, 2.0)]
    np.testing.assert_allclose(Mifa().aggregate(g, mixed, round=1)["w"],
                               FedAvg().aggregate(g, mixed, round=1)["w"], rtol=1e-6)  # fmt: skip


def test_max_staleness_forgets_clients_that_stay_away() -> None:
    agg = Mifa(max_staleness=1)
    x1 = agg.aggregate(model(0.0), [dense("a", 1.0), dense("gone", 9.0)], round=1)
    assert x1["w"].tolist() == [5.0]
    x2 = agg.aggregate(x1, [dense("a", 6.0)], round=2)  # gone's +9 stands in (age 1)
    assert (x2["w"].tolist(), agg.last_stand_ins, agg.last_forgotten) == ([10.0], ["gone"], [])
    x3 = agg.aggregate(x2, [dense("a", 11.0)], round=3)  # age 2 > 1: forgotten
    assert (x3["w"].tolist(), agg.last_stand_ins, agg.last_forgotten) == ([11.0], [], ["gone"])
    assert agg.stored_senders() == ["a"]
    assert not any("gone" in key for key in agg.state_dict())
    # Unbounded (the paper's rule): gone's round-1 update keeps standing in.
    keep = Mifa()
    keep.aggregate(model(0.0), [dense("a", 1.0), dense("gone", 9.0)], round=1)
    keep.aggregate(model(0.0), [dense("a", 1.0)], round=50)
    assert keep.last_stand_ins == ["gone"]


def test_max_staleness_zero_and_uniform_weighting() -> None:
    agg = Mifa(max_staleness=0)
    agg.aggregate(model(0.0), [dense("a", 1.0), dense("b", 3.0)], round=1)
    assert agg.aggregate(model(0.0), [dense("a", 1.0)], round=2)["w"].tolist() == [1.0]
    uniform = Mifa(weighting="uniform", server_lr=0.5)
    out = uniform.aggregate(model(0.0), [dense("a", 1.0, n=1), dense("b", 3.0, n=9)], round=1)
    assert out["w"].tolist() == [0.5 * 2.0]


def test_state_round_trip_resumes_bit_for_bit() -> None:
    rng = np.random.default_rng(4)
    g = {"w": rng.standard_normal((3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}

    def round_of(rnd: int, senders: list[str]) -> list[ClientUpdate]:
        r = np.random.default_rng(rnd)
        return [ClientUpdate(sender=s, weights={k: (v + r.standard_normal(v.shape)).astype(v.dtype)
                                                for k, v in g.items()},
                             num_examples=int(r.integers(1, 30)))
                for s in senders]  # fmt: skip

    plan = [["a", "b", "c", "d"], ["a", "c"], ["b"], ["c", "d"]]
    straight = Mifa(max_staleness=2)
    weights: dict[str, Arr] = dict(g)
    for rnd, senders in enumerate(plan, start=1):
        weights = straight.aggregate(weights, round_of(rnd, senders), round=rnd)
    first = Mifa(max_staleness=2)
    cut: dict[str, Arr] = dict(g)
    for rnd, senders in enumerate(plan[:2], start=1):
        cut = first.aggregate(cut, round_of(rnd, senders), round=rnd)
    state = first.state_dict()
    assert {"delta/a/w", "delta/d/b", "examples/c", "round/b"} <= set(state)
    assert int(state["round/b"]) == 1
    assert int(state["round/a"]) == 2
    assert all(not arr.flags.writeable for key, arr in state.items() if key.startswith("delta/"))
    resumed = Mifa(max_staleness=2)
    resumed.load_state_dict({k: np.array(v) for k, v in state.items()})  # as read back
    for rnd, senders in enumerate(plan[2:], start=3):
        cut = resumed.aggregate(cut, round_of(rnd, senders), round=rnd)
    for name in g:
        assert cut[name].tobytes() == weights[name].tobytes()
    assert resumed.state_dict().keys() == straight.state_dict().keys()


def test_load_refuses_foreign_or_incomplete_state() -> None:
    with pytest.raises(AggregationError, match="cannot load state key 'm/w'"):
        Mifa().load_state_dict({"m/w": np.zeros(1)})
    with pytest.raises(AggregationError, match=r"incomplete for senders \['a'\]"):
        Mifa().load_state_dict({"delta/a/w": np.zeros(1), "examples/a": np.array(1)})
    agg = Mifa()
    agg.load_state_dict({})
    assert agg.state_dict() == {}


def test_a_failed_round_leaves_the_memory_alone() -> None:
    agg = Mifa()
    agg.aggregate(model(0.0), [dense("a", 1.0), dense("b", 2.0)], round=1)
    before = {k: v.tobytes() for k, v in agg.state_dict().items()}
    with pytest.raises(AggregationError, match="two updates from sender 'a'"):
        agg.aggregate(model(0.0), [dense("a", 5.0), dense("a", 6.0)], round=2)
    with pytest.raises(AggregationError, match="encoding"):
        agg.aggregate(model(0.0), [ClientUpdate(sender="c", weights=model(1.0), num_examples=1,
                                                encoding="sparse")], round=2)  # fmt: skip
    with pytest.raises(AggregationError, match="does not fit the model"):
        agg.aggregate(model(0.0, 1.0), [dense("a", 1.0, 1.0)], round=2)
    assert {k: v.tobytes() for k, v in agg.state_dict().items()} == before


def test_bit_identical_over_1000_arrival_orders_with_stand_ins() -> None:
    rng = np.random.default_rng(7)
    g = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}

    def upd(i: int) -> ClientUpdate:
        w = {k: (rng.standard_normal(v.shape) * 0.3 + (0 if i % 3 == 0 else v)).astype(v.dtype)
             for k, v in g.items()}  # fmt: skip
        return ClientUpdate(sender=f"c{i}", weights=w, num_examples=int(rng.integers(1, 50)),
                            encoding=DELTA if i % 3 == 0 else "dense")  # fmt: skip

    primed = Mifa(max_staleness=3)
    primed.aggregate(g, [upd(i) for i in range(10)], round=1)
    state = primed.state_dict()
    ups = [upd(i) for i in (0, 2, 3, 5, 8, 11, 12)]  # stand-ins: c1 c4 c6 c7 c9; new: c11 c12
    reference = primed.aggregate(g, ups, round=2)
    assert primed.last_stand_ins == ["c1", "c4", "c6", "c7", "c9"]
    shuffler = random.Random(3)
    for _ in range(1000):
        order = ups[:]
        shuffler.shuffle(order)
        agg = Mifa(max_staleness=3)
        agg.load_state_dict(state)
        out = agg.aggregate(g, order, round=2)
        for name in g:
            assert out[name].tobytes() == reference[name].tobytes()


def test_registry_spellings_and_bad_parameters() -> None:
    assert isinstance(make_aggregator("mifa"), Mifa)
    built = make_aggregator({"kind": "mifa", "params": {"max_staleness": 3, "server_lr": 1.5}})
    assert isinstance(built, Mifa)
    assert (built.max_staleness, built.server_lr, built.weighting) == (3, 1.5, "samples")
    for spec, field in [
        ({"kind": "mifa", "max_staleness": -1}, "protocol.aggregator.max_staleness"),
        ({"kind": "mifa", "max_staleness": 1.5}, "protocol.aggregator.max_staleness"),
        ({"kind": "mifa", "server_lr": 0}, "protocol.aggregator.server_lr"),
        ({"kind": "mifa", "weighting": "loss"}, "protocol.aggregator.weighting"),
        ({"kind": "mifa", "beta": 0.9}, "protocol.aggregator"),
    ]:
        with pytest.raises(ConfigError) as info:
            make_aggregator(spec)
        assert info.value.path == field

"""Property tests of the mixing arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.protocols.mixing import (
    consensus_distance,
    metropolis_matrix,
    metropolis_row,
    mix,
    push_sum_share,
    push_sum_step,
    spectral_gap,
)


@st.composite
def undirected(draw: st.DrawFn) -> dict[str, tuple[str, ...]]:
    n = draw(st.integers(1, 9))
    ids = [f"n{i}" for i in range(n)]
    pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :]]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True)) if pairs else []
    adj: dict[str, set[str]] = {p: set() for p in ids}
    for a, b in chosen:
        adj[a].add(b)
        adj[b].add(a)
    return {p: tuple(sorted(v)) for p, v in adj.items()}


@given(undirected())
@settings(max_examples=150, deadline=None)
def test_metropolis_matrix_is_symmetric_and_doubly_stochastic(
    adj: dict[str, tuple[str, ...]],
) -> None:
    ids, w = metropolis_matrix(adj)
    assert ids == sorted(adj)
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w.sum(axis=0), 1.0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    assert (w >= 0).all()
    for i, node in enumerate(ids):  # each peer's own row, from local knowledge only
        row = metropolis_row(len(adj[node]), {j: len(adj[j]) for j in adj[node]})
        for j, value in row.items():
            assert w[i, ids.index(j)] == pytest.approx(value)


def test_spectral_gap_positive_iff_connected() -> None:
    ring = {f"n{i}": tuple(sorted({f"n{(i - 1) % 6}", f"n{(i + 1) % 6}"})) for i in range(6)}
    assert spectral_gap(metropolis_matrix(ring)[1]) > 0.1
    split = {"a": ("b",), "b": ("a",), "c": ("d",), "d": ("c",)}
    assert spectral_gap(metropolis_matrix(split)[1]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="undirected"):
        metropolis_matrix({"a": ("b",), "b": ()})


@given(
    st.integers(2, 8).flatmap(
        lambda n: st.tuples(
            st.lists(st.floats(-100, 100), min_size=n, max_size=n),
            st.lists(st.lists(st.integers(0, n - 1), max_size=3), min_size=n, max_size=n),
            st.integers(1, 5),
        )
    )
)
@settings(max_examples=150, deadline=None)
def test_push_sum_preserves_total_mass_and_numerator(
    case: tuple[list[float], list[list[int]], int],
) -> None:
    values, raw_out, steps = case
    n = len(values)
    out = [sorted({j for j in targets if j != i}) for i, targets in enumerate(raw_out)]
    x = np.array(values, dtype=np.float64).reshape(n, 1)
    w = np.ones(n)
    for _ in range(steps):
        x, w = push_sum_step(x, w, out)
        assert w.sum() == pytest.approx(n)
        assert x.sum() == pytest.approx(sum(values), abs=1e-9)


def test_push_sum_on_a_strongly_connected_digraph_finds_the_average() -> None:
    n = 7
    out = [[(i + 1) % n, (i + 3) % n] for i in range(n)]
    x = np.arange(n, dtype=np.float64).reshape(n, 1)
    w = np.ones(n)
    for _ in range(80):
        x, w = push_sum_step(x, w, out)
    np.testing.assert_allclose((x[:, 0] / w), (n - 1) / 2)
    share, mass = push_sum_share({"v": np.ones(2, np.float32)}, 1.0, 4)
    assert share["v"].dtype == np.float64
    assert mass == 0.25
    with pytest.raises(ValueError, match="parts"):
        push_sum_share({}, 1.0, 0)


def test_mix_and_consensus_distance() -> None:
    models = {
        "a": {"w": np.array([0.0, 2.0], np.float32)},
        "b": {"w": np.array([2.0, 0.0], np.float32)},
    }
    mixed = mix(models, {"b": 0.5, "a": 0.5}, like=models["a"])
    np.testing.assert_allclose(mixed["w"], [1.0, 1.0])
    assert mixed["w"].dtype == np.float32
    assert consensus_distance([]) == 0.0
    assert consensus_distance([models["a"], models["a"]]) == 0.0
    assert consensus_distance(list(models.values())) == pytest.approx(np.sqrt(2.0))

"""Partitions and the federation builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.errors import ConfigError
from fedbus.learning.partition import (
    build_federation_data,
    load_node_data,
    partition_indices,
    split_dirichlet,
    split_iid,
    split_shards,
    split_test,
)

IDS = [f"client-{i}" for i in range(20)]


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 500), clients=st.integers(1, 30), seed=st.integers(0, 2**32))
def test_iid_covers_every_index_once(n: int, clients: int, seed: int) -> None:
    if n < clients:
        with pytest.raises(ConfigError):
            split_iid(n, clients, np.random.default_rng(seed))
        return
    parts = split_iid(n, clients, np.random.default_rng(seed))
    assert len(parts) == clients
    assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(50, 600),
    classes=st.integers(1, 10),
    clients=st.integers(1, 12),
    alpha=st.floats(0.01, 100.0),
    min_samples=st.integers(0, 4),
    seed=st.integers(0, 2**32),
)
def test_dirichlet_covers_every_index_and_respects_the_minimum(
    n: int, classes: int, clients: int, alpha: float, min_samples: int, seed: int
) -> None:
    y = np.random.default_rng(seed).integers(0, classes, n).astype(np.int64)
    parts = split_dirichlet(
        y, clients, np.random.default_rng(seed), alpha=alpha, min_samples=min_samples
    )
    assert len(parts) == clients
    assert_exact_cover(parts, n)
    assert min(len(p) for p in parts) >= min_samples


def test_dirichlet_tops_up_when_redraws_cannot_help() -> None:
    # 40 examples, 8 clients, 5 each: a tiny alpha makes almost every draw fail.
    y = np.repeat(np.arange(2), 20).astype(np.int64)
    parts = split_dirichlet(y, 8, np.random.default_rng(0), alpha=0.001, min_samples=5)
    assert_exact_cover(parts, 40)
    assert all(len(p) == 5 for p in parts)


def test_dirichlet_skews_labels_and_is_reproducible() -> None:
    y = np.repeat(np.arange(10), 100).astype(np.int64)
    a = split_dirichlet(y, 10, np.random.default_rng(1), alpha=0.1)
    b = split_dirichlet(y, 10, np.random.default_rng(1), alpha=0.1)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa, pb)
    # Small alpha: a typical client is dominated by one or two labels.
    top_share = [np.bincount(y[p], minlength=10).max() / len(p) for p in a]
    assert np.median(top_share) > 0.5


def test_dirichlet_rejects_impossible_minimums() -> None:
    y = np.zeros(10, np.int64)
    with pytest.raises(ConfigError, match="cannot give 5 clients 3 each"):
        split_dirichlet(y, 5, np.random.default_rng(0), alpha=1.0, min_samples=3)
    with pytest.raises(ConfigError, match="alpha"):
        split_dirichlet(y, 2, np.random.default_rng(0), alpha=0.0)


def test_shards_give_each_client_few_labels() -> None:
    y = np.repeat(np.arange(10), 100).astype(np.int64)
    parts = split_shards(y, 20, np.random.default_rng(0))
    assert_exact_cover(parts, 1000)
    assert all(len(p) == 50 for p in parts)
    assert all(len(np.unique(y[p])) <= 2 for p in parts)
    parts3 = split_shards(y, 10, np.random.default_rng(0), shards_per_client=3)
    assert_exact_cover(parts3, 1000)


def test_stratified_test_split() -> None:
    y = np.repeat(np.arange(4), [100, 50, 10, 40]).astype(np.int64)
    train, test = split_test(y, 0.2, np.random.default_rng(0))
    assert_exact_cover([train, test], 200)
    np.testing.assert_array_equal(np.bincount(y[test]), [20, 10, 2, 8])


def test_partition_indices_validates_its_parameters() -> None:
    y = np.zeros(100, np.int64)
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="unknown key") as info:
        partition_indices("iid", y, 2, {"alpha": 1}, rng)
    assert info.value.path == "data.partition"
    with pytest.raises(ConfigError) as info:
        partition_indices("dirichlet", y, 2, {"alpha": "x"}, rng)
    assert info.value.path == "data.partition.alpha"
    with pytest.raises(ConfigError) as info:
        partition_indices("natural", y, 2, {}, rng)
    assert info.value.path == "data.partition.kind"
    with pytest.raises(ConfigError, match="unknown partition"):
        partition_indices("round-robin", y, 2, {}, rng)


def test_build_digits_federation() -> None:
    pytest.importorskip("sklearn")
    fed = build_federation_data(
        "digits", {}, "dirichlet", {"alpha": 0.5}, IDS, test_fraction=0.2, seed=0
    )
    assert list(fed.train) == IDS
    assert fed.num_classes == 10
    assert fed.num_features == 64
    assert len(fed.test) == 359
    assert sum(len(d) for d in fed.train.values()) + len(fed.test) == 1797
    assert min(len(d) for d in fed.train.values()) >= 10
    assert fed.test.image_shape == (1, 8, 8)
    # Train and test are disjoint: no test row appears among the training rows.
    train_rows = {r.tobytes() for d in fed.train.values() for r in d.x}
    overlap = sum(r.tobytes() in train_rows for r in fed.test.x)
    assert overlap <= 5  # digits has a handful of duplicate images, nothing more
    again = build_federation_data(
        "digits", {}, "dirichlet", {"alpha": 0.5}, IDS, test_fraction=0.2, seed=0
    )
    for cid in IDS:
        np.testing.assert_array_equal(fed.train[cid].y, again.train[cid].y)
    other = build_federation_data("digits", {}, "iid", {}, IDS, test_fraction=0.2, seed=1)
    assert not np.array_equal(other.test.y, fed.test.y)


def test_build_synthetic_natural() -> None:
    ids = [f"c{i}" for i in range(1000)]
    fed = build_federation_data(
        "synthetic",
        {"alpha": 0, "beta": 0, "samples_per_client": 20},
        "natural",
        {},
        ids,
        test_fraction=0.2,
        seed=0,
    )
    assert all(len(d) == 16 for d in fed.train.values())
    assert len(fed.test) == 4 * 1000
    assert (fed.num_features, fed.num_classes) == (60, 10)


def test_build_synthetic_pooled_iid_and_errors() -> None:
    ids = ["a", "b", "c"]
    fed = build_federation_data(
        "synthetic", {"alpha": 1, "beta": 1}, "iid", {}, ids, test_fraction=0.1, seed=0
    )
    assert sorted(fed.train) == ids
    with pytest.raises(ConfigError) as info:
        build_federation_data(
            "synthetic", {"gamma": 1}, "natural", {}, ids, test_fraction=0.1, seed=0
        )
    assert info.value.path == "data.synthetic"
    with pytest.raises(ConfigError, match="unknown data set"):
        build_federation_data("mnist", {}, "iid", {}, ids, test_fraction=0.1, seed=0)
    with pytest.raises(ConfigError) as info:
        build_federation_data("digits", {}, "natural", {}, ids, test_fraction=0.1, seed=0)
    assert info.value.path == "data.partition.kind"
    with pytest.raises(ConfigError) as info:
        build_federation_data("npz", {}, "iid", {}, ids, test_fraction=0.1, seed=0)
    assert info.value.path == "data.npz.path"
    with pytest.raises(ConfigError) as info:
        build_federation_data("synthetic", {}, "natural", {}, ids, test_fraction=1.0, seed=0)
    assert info.value.path == "data.test_fraction"


def test_build_npz_and_node_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.random((90, 4)), y=np.repeat(np.arange(3), 30))
    fed = build_federation_data(
        "npz", {"path": str(path)}, "shards", {}, ["a", "b", "c"], test_fraction=0.2, seed=0
    )
    assert len(fed.test) == 18
    assert fed.num_features == 4
    node = load_node_data(path, num_classes=5, num_features=4)
    assert node.num_classes == 5
    with pytest.raises(
        ConfigError, match=r"d\.npz: examples have 4 features, the model expects 64"
    ):
        load_node_data(path, num_classes=5, num_features=64)

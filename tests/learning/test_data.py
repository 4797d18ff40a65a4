"""Datasets: digits, npz files and LEAF/FedProx Synthetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedbus.errors import ConfigError
from fedbus.learning.data import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_FEATURES,
    Dataset,
    load_digits,
    load_npz,
    synthetic_devices,
)


def test_digits_shapes_and_range() -> None:
    pytest.importorskip("sklearn")
    data = load_digits()
    assert data.x.shape == (1797, 64)
    assert data.x.dtype == np.float32
    assert data.y.dtype == np.int64
    assert data.num_classes == 10
    assert float(data.x.min()) == 0.0
    assert float(data.x.max()) == 1.0
    assert set(np.unique(data.y)) == set(range(10))
    assert data.images.shape == (1797, 1, 8, 8)
    assert np.shares_memory(data.images, data.x)


def test_digits_is_the_same_every_time_and_read_only() -> None:
    pytest.importorskip("sklearn")
    a, b = load_digits(), load_digits()
    np.testing.assert_array_equal(a.x, b.x)
    with pytest.raises(ValueError, match="read-only"):
        a.x[0, 0] = 1.0


def test_dataset_rejects_wrong_dtypes_and_lengths() -> None:
    with pytest.raises(TypeError):
        Dataset(np.zeros((2, 3)), np.zeros(2, np.int64), 2)
    with pytest.raises(ValueError, match="n examples"):
        Dataset(np.zeros((2, 3), np.float32), np.zeros(3, np.int64), 2)
    with pytest.raises(ValueError, match="no image shape"):
        _ = Dataset(np.zeros((2, 3), np.float32), np.zeros(2, np.int64), 2).images


def test_npz_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "mine.npz"
    np.savez(path, x=np.arange(12, dtype=np.float64).reshape(4, 3), y=np.array([0, 2, 1, 2]))
    data = load_npz(path)
    assert data.x.dtype == np.float32
    assert data.x.shape == (4, 3)
    assert data.num_classes == 3
    assert load_npz(path, num_classes=5).num_classes == 5


def test_npz_images_get_an_image_shape(tmp_path: Path) -> None:
    path = tmp_path / "img.npz"
    np.savez(path, x=np.zeros((2, 5, 5)), y=np.array([0, 1]))
    assert load_npz(path).image_shape == (1, 5, 5)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 3))}, r"missing array\(s\) \['y'\]"),
        ({"x": np.zeros((2, 3)), "y": np.zeros(3, np.int64)}, "x has 2 rows but y has 3"),
        ({"x": np.zeros((2, 3)), "y": np.zeros(2)}, "y must be a 1-d integer array"),
        ({"x": np.zeros(2), "y": np.zeros(2, np.int64)}, "x must be a numeric array"),
        ({"x": np.full((1, 2), np.nan), "y": np.zeros(1, np.int64)}, "NaN"),
        ({"x": np.zeros((1, 2)), "y": np.array([-1])}, "non-negative"),
    ],
)
def test_npz_errors_name_the_file(tmp_path: Path, arrays: dict[str, object], message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message) as info:
        load_npz(path)
    assert "bad.npz" in str(info.value)


def test_npz_refuses_pickles_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "pickled.npz"
    np.savez(path, x=np.array([object()], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(ConfigError, match=r"pickled\.npz"):
        load_npz(path)
    with pytest.raises(ConfigError, match=r"nothere\.npz"):
        load_npz(tmp_path / "nothere.npz")
    np.savez(tmp_path / "y.npz", x=np.zeros((1, 2)), y=np.array([4]))
    with pytest.raises(ConfigError, match="does not fit num_classes=2"):
        load_npz(tmp_path / "y.npz", num_classes=2)


def test_synthetic_follows_the_generator() -> None:
    devices = synthetic_devices(8, alpha=1.0, beta=1.0, seed=3)
    for dev in devices:
        data = dev.data
        assert data.x.shape[1] == SYNTHETIC_FEATURES
        assert len(data) >= 50  # floor(lognormal) + 50
        assert data.y.min() >= 0
        assert data.y.max() < SYNTHETIC_CLASSES
        # y is the argmax of the device's own linear model, recomputed here.
        scores = data.x.astype(np.float64) @ dev.w + dev.b
        agree = np.mean(np.argmax(scores, axis=1) == data.y)
        assert agree > 0.99  # float32 storage may flip a near-tie
    # Devices differ: different models and input means.
    assert not np.allclose(devices[0].w, devices[1].w)
    assert devices[0].u != devices[1].u


def test_synthetic_x_has_the_stated_covariance() -> None:
    (dev,) = synthetic_devices(1, alpha=0.0, beta=0.0, seed=1, samples_per_client=20_000)
    centred = dev.data.x.astype(np.float64) - dev.v
    std = centred.std(axis=0)
    expected = np.arange(1, 61) ** -0.6
    np.testing.assert_allclose(std, expected, rtol=0.05)


def test_synthetic_zero_alpha_beta_means_shared_centres() -> None:
    devices = synthetic_devices(20, alpha=0.0, beta=0.0, seed=0, samples_per_client=20)
    assert all(d.u == 0.0 and d.b_mean == 0.0 for d in devices)
    assert all(len(d.data) == 20 for d in devices)
    # With u_i = 0, W_i ~ N(0, 1): the pooled weights look standard normal.
    pooled = np.concatenate([d.w.ravel() for d in devices])
    assert abs(pooled.mean()) < 0.05
    assert abs(pooled.std() - 1.0) < 0.05


def test_synthetic_is_seeded_and_prefix_stable() -> None:
    a = synthetic_devices(5, alpha=1.0, beta=1.0, seed=7)
    b = synthetic_devices(3, alpha=1.0, beta=1.0, seed=7)
    c = synthetic_devices(3, alpha=1.0, beta=1.0, seed=8)
    for da, db in zip(a, b, strict=False):
        np.testing.assert_array_equal(da.data.x, db.data.x)
        np.testing.assert_array_equal(da.data.y, db.data.y)
    assert not np.array_equal(a[0].w, c[0].w)


def test_synthetic_sample_counts_are_lognormal_plus_50() -> None:
    counts = np.array([len(d.data) for d in synthetic_devices(120, alpha=0, beta=0, seed=2)])
    assert counts.min() >= 50
    # log(n - 50) ~ N(4, 2) apart from the floor: check the median roughly.
    assert 30 < np.median(counts - 50) < 90  # e^4 = 54.6


def test_synthetic_rejects_bad_parameters() -> None:
    with pytest.raises(ConfigError):
        synthetic_devices(3, alpha=-1.0, beta=0.0, seed=0)
    with pytest.raises(ConfigError, match="samples_per_client"):
        synthetic_devices(3, alpha=0.0, beta=0.0, seed=0, samples_per_client=0)

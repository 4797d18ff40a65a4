"""The serial reference loop in benchmarks/ (the yardstick of the framework)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

PATH = Path(__file__).parents[2] / "benchmarks" / "reference_fedavg.py"


@pytest.fixture(scope="module")
def ref() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reference_fedavg", PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_fedavg_is_sample_weighted_and_order_free(ref: ModuleType) -> None:
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([3.0, 6.0], np.float32)}
    out = ref.fedavg({"b": (b, 3), "a": (a, 1)})
    np.testing.assert_array_equal(out["w"], np.array([2.5, 5.0], np.float32))
    assert out["w"].dtype == np.float32
    again = ref.fedavg({"a": (a, 1), "b": (b, 3)})
    assert out["w"].tobytes() == again["w"].tobytes()


def test_selection_is_seeded_and_sorted(ref: ModuleType) -> None:
    ids = [f"client-{i}" for i in range(30)]
    picked = ref.select_clients(0, 1, ids, 10)
    assert picked == sorted(picked)
    assert len(set(picked)) == 10
    assert picked == ref.select_clients(0, 1, list(reversed(ids)), 10)
    assert picked != ref.select_clients(0, 2, ids, 10)
    assert ref.select_clients(0, 1, ids, 30) == sorted(ids)


def test_reference_run_is_reproducible_and_learns(ref: ModuleType) -> None:
    kwargs = dict(
        dataset="synthetic",
        data_params={"alpha": 0.5, "beta": 0.5, "samples_per_client": 60},
        partition="natural",
        partition_params={},
        num_clients=6,
        clients_per_round=3,
        model="logreg",
        epochs=2,
        batch_size=10,
        lr=0.05,
        rounds=8,
        mu=0.1,
        seed=4,
    )
    w1, h1 = ref.run_reference(**kwargs)
    w2, h2 = ref.run_reference(**kwargs)
    for name in w1:
        assert w1[name].tobytes() == w2[name].tobytes()
    assert [r["accuracy"] for r in h1] == [r["accuracy"] for r in h2]
    assert len(h1) == 8
    assert all(r["participants"] == 3 for r in h1)
    assert h1[-1]["loss"] < h1[0]["loss"]


def test_cli_prints_rounds(ref: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    assert ref.main(["--preset", "digits", "--rounds", "2", "--clients", "5"]) == 0
    out = capsys.readouterr().out
    assert "round    2  accuracy" in out
    assert "final accuracy" in out

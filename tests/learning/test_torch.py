"""The torch trainer and the ``cnn`` model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedbus.learning.data import Dataset
from fedbus.learning.trainer import FitConfig, Trainer
from fedbus.learning.trainers import make_trainer

torch = pytest.importorskip("torch")

from fedbus.learning.torch import TorchTrainer, cnn  # noqa: E402  (after the skip)


def images(n: int = 200, seed: int = 0) -> Dataset:
    """8x8 images whose class is which quadrant is bright: easy for a conv net."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.random((n, 8, 8)) * 0.2
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 0.8
    return Dataset(x.reshape(n, 64).astype(np.float32), y.astype(np.int64), 4, (1, 8, 8))


DATA = images()


def linear() -> Any:
    return torch.nn.Sequential(torch.nn.Linear(64, 4))


def test_weights_round_trip_in_state_dict_order() -> None:
    trainer = TorchTrainer(lambda: cnn((1, 8, 8), 4), DATA, DATA)
    assert isinstance(trainer, Trainer)
    w = trainer.initial_weights(0)
    assert list(w) == list(trainer.module.state_dict())
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in w.values())
    again = trainer.initial_weights(0)
    for name in w:
        np.testing.assert_array_equal(w[name], again[name])
    # Zero epochs: what goes in comes out, and the input arrays are untouched.
    copy = {k: v.copy() for k, v in w.items()}
    out = trainer.fit(w, FitConfig(epochs=0))
    for name in w:
        np.testing.assert_array_equal(out.weights[name], copy[name])
        assert not np.shares_memory(out.weights[name], w[name])


def test_cnn_trains_deterministically() -> None:
    trainer = make_trainer("cnn", DATA, DATA, num_features=64, num_classes=4)
    assert isinstance(trainer, TorchTrainer)
    assert torch.get_num_threads() == 1
    w = trainer.initial_weights(0)
    before = trainer.evaluate(w)
    cfg = FitConfig(epochs=3, batch_size=16, lr=0.1, seed=5)
    a = trainer.fit(w, cfg)
    held = {k: v.copy() for k, v in a.weights.items()}
    b = trainer.fit(w, cfg)
    for name in w:
        np.testing.assert_array_equal(a.weights[name], b.weights[name])
        # The second fit did not write into the arrays the first one returned.
        np.testing.assert_array_equal(a.weights[name], held[name])
    after = trainer.evaluate(a.weights)
    assert after.loss < before.loss
    assert after.accuracy > 0.8
    assert a.num_examples == len(DATA)


def test_torch_and_numpy_sgd_agree_on_a_linear_model() -> None:
    # Same data order, same batches, same update rule: the same weights up to float error.
    numpy_trainer = make_trainer("logreg", DATA, None, num_features=64, num_classes=4)
    torch_trainer = TorchTrainer(linear, DATA)
    w = numpy_trainer.initial_weights(0)
    tw = {"0.weight": w["dense0.w"].T.copy(), "0.bias": w["dense0.b"]}
    cfg = FitConfig(epochs=2, batch_size=10, lr=0.1, mu=0.5, seed=3)
    a = numpy_trainer.fit(w, cfg).weights
    b = torch_trainer.fit(tw, cfg).weights
    np.testing.assert_allclose(a["dense0.w"].T, b["0.weight"], atol=1e-5)
    np.testing.assert_allclose(a["dense0.b"], b["0.bias"], atol=1e-5)


def module_factory(num_features: int, num_classes: int) -> Any:
    return torch.nn.Sequential(torch.nn.Linear(num_features, num_classes))


def test_factory_returning_a_module_is_wrapped() -> None:
    trainer = make_trainer(
        {"factory": f"{__name__}:module_factory"}, DATA, None, num_features=64, num_classes=4
    )
    assert isinstance(trainer, TorchTrainer)
    assert list(trainer.initial_weights(0)) == ["0.weight", "0.bias"]


def test_load_rejects_mismatched_weights() -> None:
    trainer = TorchTrainer(linear, DATA)
    w = trainer.initial_weights(0)
    with pytest.raises(ValueError, match="do not fit"):
        trainer.evaluate({"0.weight": w["0.weight"]})
    with pytest.raises(ValueError, match="expected shape"):
        trainer.evaluate({**w, "0.bias": np.zeros(3, np.float32)})

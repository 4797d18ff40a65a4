"""Numpy models and trainers, the model factory, and seed derivation."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from fedbus.errors import ConfigError
from fedbus.learning.data import Dataset
from fedbus.learning.numpy_models import DenseNetwork, logistic_regression, mlp
from fedbus.learning.seeds import derive_seed, fit_seed, init_seed
from fedbus.learning.trainer import EvalResult, FitConfig, FitResult, NamedArrays, Trainer
from fedbus.learning.trainers import NumpyTrainer, make_trainer


def blobs(n: int = 300, features: int = 8, classes: int = 3, seed: int = 0) -> Dataset:
    """Separable Gaussian blobs: something every model should learn quickly."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, features))
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.normal(0, 1, (n, features))
    return Dataset(x.astype(np.float32), y.astype(np.int64), classes)


DATA = blobs()


def test_parameter_names_and_shapes() -> None:
    net = mlp(64, 10, (32,))
    weights = net.init(0)
    assert list(weights) == ["dense0.w", "dense0.b", "dense1.w", "dense1.b"]
    assert weights["dense0.w"].shape == (64, 32)
    assert weights["dense1.b"].shape == (10,)
    assert all(w.dtype == np.float32 for w in weights.values())
    assert list(logistic_regression(60, 10).init(0)) == ["dense0.w", "dense0.b"]
    with pytest.raises(ValueError, match="hidden layer"):
        mlp(4, 2, ())


def test_init_is_deterministic_and_scaled() -> None:
    net = mlp(64, 10, (256,))
    a, b, c = net.init(1), net.init(1), net.init(2)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["dense0.w"], c["dense0.w"])
    assert abs(a["dense0.w"].std() - np.sqrt(2 / 64)) < 0.01  # He normal
    limit = np.sqrt(6 / (256 + 10))  # Glorot uniform
    assert np.abs(a["dense1.w"]).max() <= limit
    assert not a["dense0.b"].any()


@pytest.mark.parametrize("hidden", [(), (5,), (4, 3)])
def test_gradients_match_finite_differences(hidden: tuple[int, ...]) -> None:
    net = DenseNetwork(6, 3, hidden)
    rng = np.random.default_rng(0)
    params = [p.astype(np.float64) + rng.normal(0, 0.1, p.shape) for p in net.init(0).values()]
    x = rng.normal(0, 1, (7, 6))
    y = rng.integers(0, 3, 7).astype(np.int64)
    _, grads = net.loss_and_grads(params, x, y)
    eps = 1e-6
    for p, g in zip(params, grads, strict=True):
        numeric = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            keep = p[idx]
            p[idx] = keep + eps
            up, _ = net.loss_and_grads(params, x, y)
            p[idx] = keep - eps
            down, _ = net.loss_and_grads(params, x, y)
            p[idx] = keep
            numeric[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-7)


def test_loss_and_correct_agree_with_loss_and_grads() -> None:
    net = mlp(8, 3, (4,))
    params = list(net.init(0).values())
    loss, _ = net.loss_and_grads(params, DATA.x, DATA.y)
    loss_sum, correct = net.loss_and_correct(params, DATA.x, DATA.y)
    assert loss_sum / len(DATA) == pytest.approx(loss, rel=1e-5)
    assert 0 <= correct <= len(DATA)


def test_numpy_trainer_is_a_trainer_and_learns() -> None:
    trainer = NumpyTrainer(mlp(8, 3, (16,)), DATA, DATA)
    assert isinstance(trainer, Trainer)
    weights = trainer.initial_weights(0)
    before = trainer.evaluate(weights)
    result = trainer.fit(weights, FitConfig(epochs=3, batch_size=16, lr=0.1, seed=1))
    after = trainer.evaluate(result.weights)
    assert isinstance(result, FitResult)
    assert isinstance(after, EvalResult)
    assert result.num_examples == len(DATA)
    assert after.loss < before.loss / 2
    assert after.accuracy > 0.9
    assert after.num_examples == len(DATA)
    assert result.metrics["train_loss"] > 0
    assert all(w.dtype == np.float32 for w in result.weights.values())
    # The weights passed in are never changed.
    np.testing.assert_array_equal(weights["dense0.w"], trainer.initial_weights(0)["dense0.w"])


def test_loss_decreases_on_digits() -> None:
    pytest.importorskip("sklearn")
    from fedbus.learning.data import load_digits

    digits = load_digits()
    trainer = make_trainer(
        {"kind": "mlp", "hidden": [32]}, digits, digits, num_features=64, num_classes=10
    )
    weights = trainer.initial_weights(0)
    losses = [trainer.evaluate(weights).loss]
    for epoch in range(3):
        weights = dict(trainer.fit(weights, FitConfig(epochs=1, lr=0.05, seed=epoch)).weights)
        losses.append(trainer.evaluate(weights).loss)
    assert losses == sorted(losses, reverse=True)
    assert trainer.evaluate(weights).accuracy > 0.9


def test_fit_is_deterministic_for_a_seed() -> None:
    trainer = NumpyTrainer(mlp(8, 3, (16,)), DATA)
    w0 = trainer.initial_weights(0)
    cfg = FitConfig(epochs=2, batch_size=7, lr=0.05, seed=42)
    a, b = trainer.fit(w0, cfg), trainer.fit(w0, cfg)
    c = trainer.fit(w0, FitConfig(epochs=2, batch_size=7, lr=0.05, seed=43))
    for name in a.weights:
        np.testing.assert_array_equal(a.weights[name], b.weights[name])
    assert not np.array_equal(a.weights["dense0.w"], c.weights["dense0.w"])


def distance(a: NamedArrays | Any, b: NamedArrays | Any) -> float:
    return float(sum(np.sum((np.asarray(a[k]) - np.asarray(b[k])) ** 2) for k in a) ** 0.5)


def test_fedprox_pulls_towards_the_global_weights() -> None:
    trainer = NumpyTrainer(logistic_regression(8, 3), DATA)
    w0 = trainer.initial_weights(0)
    drift = {
        mu: distance(trainer.fit(w0, FitConfig(epochs=5, lr=0.05, mu=mu, seed=1)).weights, w0)
        for mu in (0.0, 0.1, 1.0, 10.0)
    }
    assert drift[0.0] > drift[0.1] > drift[1.0] > drift[10.0]


def test_weights_of_other_dtypes_are_accepted() -> None:
    trainer = NumpyTrainer(logistic_regression(8, 3), DATA, DATA)
    w64 = {k: v.astype(np.float64) for k, v in trainer.initial_weights(0).items()}
    assert trainer.evaluate(w64).num_examples == len(DATA)
    out = trainer.fit(w64, FitConfig(mu=1.0))
    assert all(v.dtype == np.float32 for v in out.weights.values())


def test_fedprox_term_is_mu_times_the_difference() -> None:
    # With a zero learning signal (lr tiny relative), one step's extra move is lr*mu*(w - g).
    trainer = NumpyTrainer(logistic_regression(8, 3), DATA)
    g = trainer.initial_weights(0)
    params = [np.array(v) for v in g.values()]
    anchor = [v - 1.0 for v in params]  # global weights one unit below
    plain = [p.copy() for p in params]
    xb, yb = DATA.x[:4], DATA.y[:4]
    trainer.sgd_step(plain, None, xb, yb, FitConfig(lr=0.1))
    trainer.sgd_step(params, anchor, xb, yb, FitConfig(lr=0.1, mu=0.5))
    for p, q in zip(params, plain, strict=True):
        np.testing.assert_allclose(q - p, 0.1 * 0.5 * 1.0, rtol=1e-5)


def test_fit_config_validates() -> None:
    with pytest.raises(ConfigError) as info:
        FitConfig(batch_size=0)
    assert info.value.path == "training.batch_size"
    for bad in ({"lr": 0.0}, {"mu": -1.0}, {"epochs": -1}):
        with pytest.raises(ConfigError):
            FitConfig(**bad)


def test_trainer_errors() -> None:
    trainer = NumpyTrainer(mlp(8, 3, (4,)), None, DATA)
    w = trainer.initial_weights(0)
    with pytest.raises(RuntimeError, match="no training data"):
        trainer.fit(w, FitConfig())
    with pytest.raises(ValueError, match="do not fit"):
        trainer.evaluate({"dense0.w": w["dense0.w"]})
    with pytest.raises(ValueError, match="expected shape"):
        trainer.evaluate({**w, "dense0.b": np.zeros(5, np.float32)})
    with pytest.raises(ConfigError, match="features"):
        NumpyTrainer(mlp(9, 3, (4,)), DATA)
    empty = NumpyTrainer(mlp(8, 3, (4,)), None, DATA.subset(slice(0, 0)))
    assert empty.evaluate(w) == EvalResult(loss=0.0, accuracy=0.0, num_examples=0)


class MyTrainer(NumpyTrainer):
    """A user's trainer class, found through ``factory``."""

    def __init__(self, num_features: int, num_classes: int, train: Dataset | None) -> None:
        super().__init__(logistic_regression(num_features, num_classes), train)


def trainer_factory(train: Dataset | None, num_features: int, num_classes: int) -> Trainer:
    return MyTrainer(num_features, num_classes, train)


def trainer_class_factory() -> type:
    return MyTrainer


def not_a_model() -> int:
    return 3


def failing_factory() -> None:
    raise RuntimeError("boom")


def test_make_trainer_kinds() -> None:
    kw: dict[str, Any] = {"num_features": 8, "num_classes": 3}
    assert list(make_trainer("logreg", DATA, None, **kw).initial_weights(0)) == [
        "dense0.w",
        "dense0.b",
    ]
    names = list(
        make_trainer({"kind": "mlp", "hidden": [5, 4]}, DATA, None, **kw).initial_weights(0)
    )
    assert names[-1] == "dense2.b"
    for spec in (
        f"{__name__}:trainer_factory",
        f"{__name__}:MyTrainer",
        f"{__name__}:trainer_class_factory",
    ):
        trainer = make_trainer({"factory": spec}, DATA, None, **kw)
        assert isinstance(trainer, MyTrainer)


@pytest.mark.parametrize(
    ("spec", "path", "message"),
    [
        ("svm", "model.kind", "unknown model kind"),
        ({"kind": "mlp", "hidden": [0]}, "model.hidden", "positive integers"),
        ({"kind": "mlp", "hidden": "32"}, "model.hidden", "positive integers"),
        ({"kind": "logreg", "hidden": [3]}, "model", "unknown key"),
        ({"factory": "nodots"}, "model.factory", "package.module:function"),
        ({"factory": "no_such_module_xyz:fn"}, "model.factory", "cannot import"),
        ({"factory": "fedbus.errors:nothing"}, "model.factory", "no attribute"),
        ({"factory": "fedbus.errors:__doc__"}, "model.factory", "not callable"),
        ({"factory": f"{__name__}:not_a_model"}, "model.factory", "returned int"),
        ({"factory": f"{__name__}:failing_factory"}, "model.factory", "RuntimeError: boom"),
        ({"factory": f"{__name__}:trainer_factory", "extra": 1}, "model", "unknown key"),
        (3, "model", "expected a kind name or a mapping"),
    ],
)
def test_make_trainer_errors(spec: Any, path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        make_trainer(spec, DATA, None, num_features=8, num_classes=3)
    assert info.value.path == path


def test_seed_derivation_is_stable() -> None:
    # The documented rule, recomputed, and a pinned value other hosts can check.
    text = "\x1f".join(["0", "fit", "5", "client-3"]).encode()
    expected = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1
    assert fit_seed(0, 5, "client-3") == expected == 4705461142844496695
    assert init_seed(0) == derive_seed(0, "init")
    assert fit_seed(0, 5, "client-3") != fit_seed(0, 5, "client-4") != fit_seed(0, 6, "client-4")
    assert 0 <= derive_seed(2**70, "x") < 2**63
    with pytest.raises(TypeError):
        derive_seed(0, 1.5)  # type: ignore[arg-type]

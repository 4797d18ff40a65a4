"""``cnn`` on a board without torch: the numpy conv features, head-only training, selection."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.learning.data import Dataset
from fedbus.learning.numpy_cnn import (
    CONV_CHANNELS,
    HEAD,
    NumpyHeadTrainer,
    cnn_features,
    cnn_logits,
)
from fedbus.learning.trainer import FitConfig, FitResult, Trainer
from fedbus.learning.trainers import make_trainer


def images(n: int, shape: tuple[int, int, int], classes: int = 4, seed: int = 0) -> Dataset:
    """Images whose class is which quadrant is bright, plus noise."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    y = rng.integers(0, classes, n)
    x = rng.random((n, c, h, w)) * 0.2
    for i, label in enumerate(y):
        r, q = divmod(int(label) % 4, 2)
        x[i, :, r * (h // 2) : (r + 1) * (h // 2), q * (w // 2) : (q + 1) * (w // 2)] += 0.8
    return Dataset(x.reshape(n, -1).astype(np.float32), y.astype(np.int64), classes, shape)


DATA = images(120, (1, 8, 8))


def test_frozen_tensors_come_back_unchanged_and_the_head_learns() -> None:
    trainer = NumpyHeadTrainer((1, 8, 8), 4, DATA)
    assert isinstance(trainer, Trainer)
    w = trainer.initial_weights(3)
    assert list(w) == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", *HEAD]
    copy = {k: v.copy() for k, v in w.items()}
    cfg = FitConfig(epochs=5, batch_size=16, lr=0.2, seed=1)
    out = trainer.fit(w, cfg)
    for name in w:
        np.testing.assert_array_equal(w[name], copy[name])  # the input is untouched
        if name in HEAD:
            assert not np.array_equal(out.weights[name], w[name]), name
        else:
            np.testing.assert_array_equal(out.weights[name], w[name])
            assert not np.shares_memory(out.weights[name], w[name])
    assert trainer.evaluate(out.weights).accuracy > trainer.evaluate(w).accuracy + 0.2
    again = trainer.fit(w, cfg)
    for name in w:
        np.testing.assert_array_equal(again.weights[name], out.weights[name])


def test_bad_weights_are_refused() -> None:
    trainer = NumpyHeadTrainer((1, 8, 8), 4, DATA)
    w = trainer.initial_weights(0)
    with pytest.raises(ValueError, match="do not fit"):
        trainer.fit({k: v for k, v in w.items() if k != "fc.bias"}, FitConfig())
    w["fc.weight"] = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"fc\.weight"):
        trainer.evaluate(w)


def test_make_trainer_falls_back_to_the_head_when_torch_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A None entry in sys.modules makes the import raise ImportError, as on a board.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "fedbus.learning.torch", None)
    with caplog.at_level(logging.WARNING, logger="fedbus.learning.trainers"):
        trainer = make_trainer("cnn", DATA, None, num_features=64, num_classes=4)
    assert isinstance(trainer, NumpyHeadTrainer)
    assert "torch is not available" in caplog.text
    assert "head only, in numpy" in caplog.text
    with pytest.raises(Exception, match="needs torch"):
        make_trainer("cnn", DATA, None, num_features=64, num_classes=4, cnn_trainer="torch")


def test_make_trainer_numpy_head_on_request() -> None:
    trainer = make_trainer(
        "cnn", DATA, None, num_features=64, num_classes=4, cnn_trainer="numpy-head"
    )
    assert isinstance(trainer, NumpyHeadTrainer)
    with pytest.raises(Exception, match="expected one of"):
        make_trainer("cnn", DATA, None, num_features=64, num_classes=4, cnn_trainer="jax")


# ---- against torch -------------------------------------------------------------------------


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch")


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 9, 11)])
def test_numpy_features_and_logits_equal_the_torch_forward(torch: Any, shape: Any) -> None:
    from fedbus.learning.torch import DigitsCNN, state_to_arrays

    torch.manual_seed(0)
    module = DigitsCNN(shape, 5)
    assert (module.conv1.out_channels, module.conv2.out_channels) == CONV_CHANNELS
    weights = state_to_arrays(module)
    x = images(64, shape, classes=5, seed=2).x
    with torch.no_grad():
        t = torch.from_numpy(x).reshape(len(x), *shape)
        t = torch.nn.functional.max_pool2d(torch.relu(module.conv1(t)), 2)
        t = torch.nn.functional.max_pool2d(torch.relu(module.conv2(t)), 2)
        want_features = t.flatten(1).numpy()
        want_logits = module(torch.from_numpy(x)).numpy()
    got = cnn_features(weights, x, shape)
    assert got.dtype == np.float32
    assert got.shape == want_features.shape
    assert np.abs(got - want_features).max() < 1e-5
    assert np.abs(cnn_logits(weights, x, shape) - want_logits).max() < 1e-5


def test_head_training_equals_torch_with_the_convs_frozen(torch: Any) -> None:
    """The same SGD as the torch trainer on a DigitsCNN whose conv layers do not train."""
    from fedbus.learning.torch import DigitsCNN, TorchTrainer

    def frozen() -> Any:
        module = DigitsCNN((1, 8, 8), 4)
        for p in (*module.conv1.parameters(), *module.conv2.parameters()):
            p.requires_grad_(False)
        return module

    reference = TorchTrainer(frozen, DATA, DATA)
    w = reference.initial_weights(7)
    cfg = FitConfig(epochs=2, batch_size=16, lr=0.1, mu=0.01, seed=4)
    want = reference.fit(w, cfg)
    got = NumpyHeadTrainer((1, 8, 8), 4, DATA).fit(w, cfg)
    for name in w:
        np.testing.assert_allclose(got.weights[name], want.weights[name], rtol=0, atol=1e-5)
    assert got.metrics["train_loss"] == pytest.approx(want.metrics["train_loss"], abs=1e-5)
    assert NumpyHeadTrainer((1, 8, 8), 4, None, DATA).evaluate(w).accuracy == pytest.approx(
        reference.evaluate(w).accuracy
    )


class _Recording:
    """Wraps a trainer and keeps what it was given and what it sent, per fit."""

    def __init__(self, inner: Trainer) -> None:
        self.inner = inner
        self.fits: list[tuple[dict[str, Any], FitResult]] = []

    def initial_weights(self, seed: int) -> Any:
        return self.inner.initial_weights(seed)

    def fit(self, weights: Any, config: FitConfig) -> FitResult:
        result = self.inner.fit(weights, config)
        self.fits.append(({k: np.array(v) for k, v in weights.items()}, result))
        return result

    def evaluate(self, weights: Any) -> Any:
        return self.inner.evaluate(weights)


TOPOLOGY = """
name: head-only
seed: 0
broker: memory
data: {dataset: digits, partition: {kind: iid}}
model: {kind: cnn}
training: {epochs: 2, batch_size: 16, lr: 0.1}
protocol: {kind: centralized, rounds: 5, round_timeout_s: 60, join_timeout_s: 30}
nodes:
  server: {id: server}
  clients: {count: 3}
"""


async def test_a_federation_with_one_head_only_client_still_learns(
    torch: Any, tmp_path: Path
) -> None:
    """client-1 trains the head only, in numpy; the run learns about as well as all-torch."""
    from fedbus.launch import run_federation
    from fedbus.topology import loads_topology

    board: dict[str, _Recording] = {}

    def hook(node_id: str, trainer: Trainer) -> Trainer:
        if node_id != "client-1":
            return trainer
        train = trainer.train  # type: ignore[attr-defined]
        board[node_id] = _Recording(
            make_trainer(
                "cnn", train, None, num_features=64, num_classes=10, cnn_trainer="numpy-head"
            )
        )
        return board[node_id]

    accuracy = {}
    for label, trainer_hook in (("all torch", None), ("one head-only", hook)):
        out = tmp_path / label.replace(" ", "-")
        result = await run_federation(loads_topology(TOPOLOGY), out=out, trainer_hook=trainer_hook)
        assert result.server.success, result.server.reason
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(r["participants"] == 3 for r in rows)
        accuracy[label] = [r["accuracy"] for r in rows]
        print(f"accuracy by round, {label}:", [round(a, 3) for a in accuracy[label]])
    recording = board["client-1"]
    assert isinstance(recording.inner, NumpyHeadTrainer)
    assert len(recording.fits) == 5  # it took part in every round
    for given, sent in recording.fits:
        for name in given:
            if name not in HEAD:
                np.testing.assert_array_equal(sent.weights[name], given[name])
    head_only = accuracy["one head-only"]
    assert head_only[-1] > head_only[0] + 0.3
    assert head_only[-1] > accuracy["all torch"][-1] - 0.1

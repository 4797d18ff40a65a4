"""A client's tiny local work, run on the loop without a coroutine (`ClientNode._work_now`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedbus.learning.data import Dataset
from fedbus.learning.seeds import fit_seed
from fedbus.learning.trainer import FitConfig
from fedbus.learning.trainers import NumpyTrainer, make_trainer
from fedbus.nodes import client_work
from fedbus.nodes.client import ClientNode, ClientSettings
from fedbus.nodes.client_work import INLINE_WORK_S, WorkTimer
from fedbus.protocols.fedavg import Evaluate, EvaluationDone, Train, TrainingDone, TrainingFailed
from fedbus.transport.memory import MemoryBus


def _trainer() -> NumpyTrainer:
    rng = np.random.default_rng(0)
    data = Dataset(x=rng.normal(size=(20, 4)).astype(np.float32),
                   y=rng.integers(0, 3, 20).astype(np.int64), num_classes=3)  # fmt: skip
    trainer = make_trainer("logreg", data, data, num_features=4, num_classes=3, seed=0)
    assert type(trainer) is NumpyTrainer
    return trainer


def _node(trainer: NumpyTrainer) -> ClientNode:
    bus = MemoryBus()
    settings = ClientSettings(node_id="c1", namespace="ns", server_id="server", seed=7)
    return ClientNode(trainer, lambda will: bus.transport("c1", will=will), settings)


def _train(weights: dict[str, Any]) -> Train:
    return Train(round=3, weights=weights, config={"epochs": 1, "batch_size": 5, "lr": 0.1})


def test_run_now_measures_so_the_next_work_is_known_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_work, "_COST_PER_EXAMPLE", {})  # other tests' measurements
    timer = WorkTimer(_trainer(), 20)
    assert not timer.tiny("fit")  # nothing measured yet
    assert timer.run_now("fit", lambda x: x + 1, 1) == 2
    estimate = timer.estimate("fit")
    assert estimate is not None
    assert estimate < INLINE_WORK_S
    assert timer.tiny("fit")


def test_work_now_trains_exactly_like_the_trainer() -> None:
    trainer = _trainer()
    node = _node(trainer)
    weights = trainer.initial_weights(0)
    event = node._work_now(_train(weights))
    assert isinstance(event, TrainingDone)
    cfg = FitConfig(epochs=1, batch_size=5, lr=0.1, seed=fit_seed(7, 3, "c1"))
    expected = trainer.fit(weights, cfg)
    assert event.round == 3
    assert event.num_examples == expected.num_examples == 20
    for name, value in expected.weights.items():
        np.testing.assert_array_equal(event.weights[name], value)
    evaluated = node._work_now(Evaluate(round=3, weights=weights))
    assert isinstance(evaluated, EvaluationDone)
    assert evaluated.num_examples == 20
    assert set(evaluated.metrics) >= {"accuracy", "loss"}


def test_work_now_turns_a_failing_fit_into_training_failed() -> None:
    trainer = _trainer()
    node = _node(trainer)

    def broken(*_: object) -> None:
        raise ValueError("bad weights")

    trainer.fit = broken  # type: ignore[method-assign]
    event = node._work_now(_train(trainer.initial_weights(0)))
    assert isinstance(event, TrainingFailed)
    assert event.round == 3
    assert "ValueError: bad weights" in event.reason

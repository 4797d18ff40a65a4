"""Transcript tests of the FedAvg client machine."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedbus._types import RunId
from fedbus.errors import LocalProtocolError
from fedbus.protocols.fedavg import (
    CancelTraining,
    ClientState,
    Evaluate,
    EvaluationDone,
    FedAvgClient,
    ManifestReceived,
    ModelReceived,
    SendFailure,
    SendUpdate,
    Stop,
    Tick,
    Train,
    TrainingDone,
    TrainingFailed,
)

RUN = RunId("run-1")
W = {"w": np.zeros(2, np.float32)}


def model(
    round_: int, *, selected: bool = True, run: str = RUN, mid: str = "", **config: Any
) -> ModelReceived:
    return ModelReceived(run=RunId(run), round=round_, weights=W, selected=selected,
                         config={"task": "train", **config}, model_id=mid or f"m{round_}")  # fmt: skip


def done(round_: int) -> TrainingDone:
    return TrainingDone(round=round_, weights=W, num_examples=4, metrics={"loss": 0.5})


def test_trains_once_and_sends_the_update_with_reply_to() -> None:
    client = FedAvgClient(run=RUN)
    (train,) = client.handle(model(1, lr=0.1), now=0.0)
    assert isinstance(train, Train)
    assert train.config == {"lr": 0.1}
    assert client.state is ClientState.TRAINING
    (sent,) = client.handle(done(1), now=1.0)
    assert isinstance(sent, SendUpdate)
    assert (sent.round, sent.num_examples, sent.reply_to, sent.metrics) == (
        1,
        4,
        "m1",
        {"loss": 0.5},
    )
    assert client.state is ClientState.IDLE
    assert client.next_deadline() is None


def test_ignores_foreign_stale_duplicate_and_unselected_models() -> None:
    client = FedAvgClient(run=RUN)
    assert client.handle(model(2, run="other"), now=0.0) == []
    assert client.handle(model(2, selected=False), now=0.0) == []
    assert client.current_round == 2
    assert client.handle(model(1), now=0.0) == []  # past round
    assert len(client.handle(model(3), now=0.0)) == 1
    assert client.handle(model(3), now=0.0) == []  # QoS 1 duplicate
    assert client.handle(model(3, mid="retry"), now=0.0) == []  # retry of a round in progress
    client.handle(done(3), now=1.0)
    assert client.handle(model(3, mid="retry2"), now=2.0) == []  # already answered
    assert client.handle(Tick(), now=2.0) == []


def test_newer_round_cancels_stale_training_and_drops_its_result() -> None:
    client = FedAvgClient(run=RUN)
    client.handle(model(1), now=0.0)
    cancel, train = client.handle(model(2), now=1.0)
    assert cancel == CancelTraining(round=1)
    assert isinstance(train, Train)
    assert train.round == 2
    assert client.handle(done(1), now=2.0) == []  # the cancelled result
    assert isinstance(client.handle(done(2), now=3.0)[0], SendUpdate)


def test_unselected_newer_round_cancels_and_idles() -> None:
    client = FedAvgClient(run=RUN)
    client.handle(model(1), now=0.0)
    assert client.handle(model(2, selected=False), now=1.0) == [CancelTraining(round=1)]
    assert client.state is ClientState.IDLE


def test_training_failure_is_reported() -> None:
    client = FedAvgClient(run=RUN)
    client.handle(model(1), now=0.0)
    (fail,) = client.handle(TrainingFailed(round=1, reason="oom"), now=1.0)
    assert fail == SendFailure(round=1, reason="oom", reply_to="m1")


def test_federated_evaluation_then_training_packs_eval_metrics() -> None:
    client = FedAvgClient(run=RUN)
    (ev,) = client.handle(model(1, evaluate=True), now=0.0)
    assert isinstance(ev, Evaluate)
    assert client.state is ClientState.EVALUATING
    (train,) = client.handle(
        EvaluationDone(round=1, num_examples=7, metrics={"accuracy": 0.9}), now=1.0
    )
    assert isinstance(train, Train)
    assert "evaluate" not in train.config
    (sent,) = client.handle(done(1), now=2.0)
    assert isinstance(sent, SendUpdate)
    assert sent.metrics == {"loss": 0.5, "eval_num_examples": 7.0, "eval_accuracy": 0.9}


def test_evaluation_only_round_answers_with_metrics_and_no_tensors() -> None:
    client = FedAvgClient(run=RUN)
    client.handle(model(4, task="evaluate", evaluate=True), now=0.0)
    (sent,) = client.handle(
        EvaluationDone(round=4, num_examples=3, metrics={"loss": 0.2, "name": "x"}), now=1.0
    )
    assert isinstance(sent, SendUpdate)
    assert sent.weights == {}
    assert sent.num_examples == 0
    assert sent.metrics == {"eval_num_examples": 3.0, "eval_loss": 0.2}


def test_finished_manifest_stops_and_cancels() -> None:
    client = FedAvgClient(run=RUN)
    client.handle(model(1), now=0.0)
    assert client.handle(ManifestReceived(run=RUN, round=1, state="collecting"), now=0.5) == []
    cancel, stop = client.handle(ManifestReceived(run=RUN, round=2, state="finished"), now=1.0)
    assert cancel == CancelTraining(round=1)
    assert isinstance(stop, Stop)
    assert client.state is ClientState.DONE
    assert client.handle(done(1), now=2.0) == []
    assert client.handle(model(3), now=2.0) == []
    idle = FedAvgClient(run=RUN)
    assert [
        type(c) for c in idle.handle(ManifestReceived(run=RUN, round=0, state="finished"), now=0.0)
    ] == [Stop]
    assert idle.handle(ManifestReceived(run=RunId("x"), round=9, state="finished"), now=0.0) == []


def test_manifest_of_a_newer_round_makes_older_models_stale() -> None:
    client = FedAvgClient(run=RUN)
    client.handle(ManifestReceived(run=RUN, round=5, state="collecting"), now=0.0)
    assert client.handle(model(4), now=0.0) == []
    assert len(client.handle(model(5), now=0.0)) == 1


def test_results_for_rounds_never_requested_are_local_errors() -> None:
    client = FedAvgClient(run=RUN)
    with pytest.raises(LocalProtocolError, match="never requested"):
        client.handle(done(1), now=0.0)
    assert client.state is ClientState.ERROR
    with pytest.raises(LocalProtocolError, match="illegal in state ERROR"):
        client.handle(Tick(), now=0.0)


def test_wrong_result_kind_for_the_task_is_a_local_error() -> None:
    client = FedAvgClient(run=RUN)
    client.handle(model(1, evaluate=True), now=0.0)
    with pytest.raises(LocalProtocolError, match="while EVALUATING"):
        client.handle(done(1), now=1.0)


def test_time_going_backwards_is_a_local_error() -> None:
    client = FedAvgClient(run=RUN)
    client.handle(Tick(), now=5.0)
    with pytest.raises(LocalProtocolError, match="backwards"):
        client.handle(Tick(), now=1.0)

"""SCAFFOLD: the server and client arithmetic on hand-computed cases, and the machines' plumbing."""

from __future__ import annotations

import numpy as np
import pytest

from fedbus._types import NodeId, RunId
from fedbus.aggregation import (
    DELTA,
    AggregationError,
    ClientUpdate,
    Scaffold,
    broadcast_extras,
    make_aggregator,
)
from fedbus.aggregation.scaffold import CONTROL, client_control_update, correction
from fedbus.errors import ConfigError
from fedbus.learning.data import Dataset
from fedbus.learning.numpy_models import DenseNetwork
from fedbus.learning.trainer import FitConfig
from fedbus.learning.trainers import NumpyTrainer
from fedbus.protocols.fedavg import (
    BroadcastModel,
    FedAvgClient,
    FedAvgConfig,
    FedAvgServer,
    ModelReceived,
    NodeJoined,
    RoundClosed,
    SendUpdate,
    Started,
    Train,
    TrainingDone,
    UpdateReceived,
)

RUN = RunId("run-s")


def _x() -> dict[str, np.ndarray]:
    return {"w": np.array([1.0, 2.0], np.float32)}


def _two_updates() -> list[ClientUpdate]:
    return [
        ClientUpdate(
            sender="b", weights={"w": np.array([0.0, -2.0], np.float32)}, num_examples=9,
            encoding=DELTA, extras={CONTROL: {"w": np.array([0.0, 1.0], np.float32)}},
        ),
        ClientUpdate(
            sender="a", weights={"w": np.array([2.0, 2.0], np.float32)}, num_examples=1,
            extras={CONTROL: {"w": np.array([1.0, 0.0], np.float32)}},
        ),
    ]  # fmt: skip


def test_server_step_and_control_update_by_hand() -> None:
    # dy_a = [1, 0], dy_b = [0, -2]: x + mean = [1.5, 1.0] (unweighted, as in the paper);
    # c = (dc_a + dc_b) / N = [1, 1] / 4.
    agg = Scaffold(num_clients=4, weighting="uniform")
    assert broadcast_extras(agg, _x())[CONTROL]["w"].tolist() == [0.0, 0.0]
    out = agg.aggregate(_x(), _two_updates(), round=1)
    assert out["w"].dtype == np.float32
    assert out["w"].tolist() == [1.5, 1.0]
    assert broadcast_extras(agg, out)[CONTROL]["w"].tolist() == [0.25, 0.25]
    half = Scaffold(server_lr=0.5, num_clients=4, weighting="uniform")
    assert half.aggregate(_x(), _two_updates(), round=1)["w"].tolist() == [1.25, 1.5]
    # by samples (b has 9 of 10): x + 0.1 * [1, 0] + 0.9 * [0, -2]
    weighted = Scaffold(num_clients=4).aggregate(_x(), _two_updates(), round=1)
    np.testing.assert_allclose(weighted["w"], [1.1, 0.2], rtol=1e-6)


def test_fleet_size_defaults_to_the_senders_seen_and_survives_a_checkpoint() -> None:
    agg = Scaffold()
    agg.aggregate(_x(), _two_updates(), round=1)
    assert broadcast_extras(agg, _x())[CONTROL]["w"].tolist() == [0.5, 0.5]  # N = 2
    restored = Scaffold()
    restored.load_state_dict(agg.state_dict())
    assert restored.state_dict()["num_seen"] == 2
    np.testing.assert_array_equal(restored.control(_x())["w"], agg.control(_x())["w"])
    with pytest.raises(AggregationError):
        restored.load_state_dict({"m/w": np.zeros(2)})


def test_update_without_control_counts_as_zero_and_bad_control_is_refused() -> None:
    bare = ClientUpdate(sender="c", weights={"w": np.array([1.0, 2.0], np.float32)}, num_examples=1)
    agg = Scaffold(num_clients=2)
    assert agg.aggregate(_x(), [bare], round=1)["w"].tolist() == [1.0, 2.0]
    assert agg.control(_x())["w"].tolist() == [0.0, 0.0]
    wrong = ClientUpdate(
        sender="d", weights=_x(), num_examples=1, extras={CONTROL: {"w": np.zeros(3, np.float32)}}
    )
    with pytest.raises(AggregationError, match="shape"):
        agg.aggregate(_x(), [wrong], round=1)


def test_registry_and_parameter_checks() -> None:
    assert isinstance(make_aggregator({"kind": "scaffold", "server_lr": 0.5}), Scaffold)
    with pytest.raises(ConfigError, match="num_clients"):
        make_aggregator({"kind": "scaffold", "num_clients": 0})
    with pytest.raises(ConfigError, match="server_lr"):
        make_aggregator({"kind": "scaffold", "server_lr": 0})
    with pytest.raises(ConfigError, match="weighting"):
        make_aggregator({"kind": "scaffold", "weighting": "median"})


def test_client_option_two_by_hand() -> None:
    # c_i+ = c_i - c + (x - y) / (K lr) = 0 - 0.25 + 0.5 / (2 * 0.25) = 0.75
    new, delta = client_control_update(
        global_weights={"w": np.array([1.0], np.float32)},
        local_weights={"w": np.array([0.5], np.float32)},
        server_control={"w": np.array([0.25], np.float32)},
        client_control=None, steps=2, lr=0.25,
    )  # fmt: skip
    assert new["w"].tolist() == [0.75]
    assert delta["w"].tolist() == [0.75]
    again, delta2 = client_control_update(
        global_weights={"w": np.array([1.0], np.float32)},
        local_weights={"w": np.array([1.0], np.float32)},
        server_control={"w": np.array([0.25], np.float32)},
        client_control=new, steps=2, lr=0.25,
    )  # fmt: skip
    assert again["w"].tolist() == [0.5]
    assert delta2["w"].tolist() == [-0.25]
    corr = correction({"w": np.array([0.25], np.float32)}, new)
    assert corr["w"].tolist() == [-0.5]
    assert corr["w"].dtype == np.float32


def test_trainer_step_is_shifted_by_the_correction() -> None:
    rng = np.random.default_rng(0)
    data = Dataset(
        x=rng.normal(size=(8, 4)).astype(np.float32),
        y=np.arange(8, dtype=np.int64) % 3,
        num_classes=3,
    )
    trainer = NumpyTrainer(DenseNetwork(4, 3), data)
    w0 = trainer.initial_weights(1)
    corr = {n: np.full(a.shape, 0.5, np.float32) for n, a in w0.items()}
    plain = trainer.fit(w0, FitConfig(epochs=1, batch_size=8, lr=0.1))
    shifted = trainer.fit(w0, FitConfig(epochs=1, batch_size=8, lr=0.1, correction=corr))
    for n in w0:  # one full-batch step: y' = y - lr * correction
        np.testing.assert_allclose(shifted.weights[n], plain.weights[n] - 0.05, atol=1e-6)


def test_machines_carry_the_control_sets() -> None:
    server = FedAvgServer(
        FedAvgConfig(rounds=1, min_clients=1), run=RUN, weights=_x(),
        aggregator=Scaffold(num_clients=1), expected_nodes=1,
    )  # fmt: skip
    out = server.handle(Started(), now=0.0)
    out += server.handle(NodeJoined(node=NodeId("a"), num_examples=1), now=0.0)
    broadcast = next(c for c in out if isinstance(c, BroadcastModel))
    assert broadcast.extras[CONTROL]["w"].tolist() == [0.0, 0.0]
    # The client machine passes the control set to Train and the result's set to SendUpdate.
    client = FedAvgClient(run=RUN)
    cmds = client.handle(
        ModelReceived(run=RUN, round=1, weights=_x(), selected=True, config=broadcast.config,
                      model_id=broadcast.request_id, extras=broadcast.extras), now=0.0,
    )  # fmt: skip
    train = next(c for c in cmds if isinstance(c, Train))
    assert train.extras is broadcast.extras
    dc = {"w": np.array([2.0, -2.0], np.float32)}
    done = client.handle(
        TrainingDone(round=1, weights={"w": np.array([0.5, 0.5], np.float32)}, num_examples=1,
                     encoding=DELTA, extras={CONTROL: dc}), now=0.0,
    )  # fmt: skip
    send = next(c for c in done if isinstance(c, SendUpdate))
    closed = server.handle(
        UpdateReceived(sender=NodeId("a"), run=RUN, round=1, weights=send.weights,
                       num_examples=1, encoding=send.encoding, extras=send.extras), now=0.0,
    )  # fmt: skip
    rc = next(c for c in closed if isinstance(c, RoundClosed))
    assert rc.weights["w"].tolist() == [1.5, 2.5]
    assert rc.aggregator_state["control/w"].tolist() == [2.0, -2.0]

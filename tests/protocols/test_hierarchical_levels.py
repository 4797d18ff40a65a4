"""Transcripts of what every aggregation level does: defenses, evaluation, restart point.

Issue 5 asks for defenses at every aggregating node and issue 4 for per-level
metrics; these drive the edge machine through the Hierarchy harness (no
broker) and read what it sends up and reports.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hier_harness import CLOUD, RUN, Hierarchy, initial_weights

from fedbus._types import NodeId
from fedbus.aggregation import FedAvg, make_aggregator, make_validators
from fedbus.aggregation.validators import AccuracyGate, load_level_state
from fedbus.protocols.fedavg import (
    EVALUATE_KEY,
    TASK_EVALUATE,
    TASK_KEY,
    BroadcastModel,
    Evaluate,
    EvaluationClosed,
    EvaluationDone,
    FedAvgConfig,
    FedAvgServer,
    ModelReceived,
    NodeJoined,
    Reject,
    RoundClosed,
    SendUpdate,
    Started,
    Train,
    TrainingDone,
)
from fedbus.protocols.hierarchical import EdgeAggregator, TaskEnded
from fedbus.protocols.hierarchical_rehoming import TOP_ROUND_KEY

EDGE_CFG = FedAvgConfig(min_clients=1, round_timeout_s=10.0, join_timeout_s=5.0)


class Poisoned(Hierarchy):
    """The harness, with one device sending -40x its honest step and reporting evaluations."""

    def __init__(self, *args: Any, attacker: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attacker = attacker

    def finish_tasks(self, now: float, *, only: Any = None) -> None:
        for name in sorted(self.tasks if only is None else only):
            task = self.tasks.pop(name, None)
            if task is None or name not in self.alive:
                continue
            index = self.devices.index(name) + 1
            if isinstance(task, Train):
                step = -40.0 if name == self.attacker else 0.1 * index
                self.post(name, TrainingDone(
                    round=task.round, num_examples=self.examples[name], metrics={"loss": 1.0},
                    weights={k: np.asarray(v) + step for k, v in task.weights.items()},
                ))  # fmt: skip
            else:
                self.post(name, EvaluationDone(
                    round=task.round, num_examples=self.examples[name],
                    metrics={"accuracy": index / 10, "loss": 1.0},
                ))  # fmt: skip
        self.flush(now)


def with_edge(h: Hierarchy, edge: str, **kwargs: Any) -> None:
    """Replace ``edge``'s machine (before start) with one built from ``kwargs``."""
    h.machines[edge] = EdgeAggregator(EDGE_CFG, node=NodeId(edge), run=RUN, edge_rounds=2, **kwargs)


FIVE = {"edge-a": ["a1", "a2", "a3", "a4", "a5"], "edge-b": ["b1", "b2"]}
EQUAL = dict.fromkeys(["a1", "a2", "a3", "a4", "a5", "b1", "b2"], 10)


def cloud_model(h: Hierarchy) -> float:
    (value,) = set(np.asarray(h.machines[CLOUD].weights["w"]).round(6).tolist())
    return float(value)


def test_plain_fedavg_at_an_edge_takes_in_a_sign_flipping_device() -> None:
    h = Poisoned(FIVE, rounds=1, edge_rounds=2, examples=EQUAL, attacker="a5")
    h.start(0.0)
    h.run()
    (report,) = h.of("edge-a", TaskEnded)
    assert report.rejected == {}
    # edge-a's two local rounds each move by (0.1+0.2+0.3+0.4-40)/5 = -7.8
    (up,) = h.of("edge-a", SendUpdate)
    np.testing.assert_allclose(up.weights["w"], np.full(4, -15.6))


def test_a_validator_at_the_edge_rejects_the_attacker_and_reports_it_by_reason() -> None:
    h = Poisoned(FIVE, rounds=1, edge_rounds=2, examples=EQUAL, attacker="a5")
    with_edge(h, "edge-a", validators=make_validators([{"kind": "norm_outlier"}]))
    h.start(0.0)
    h.run()
    rejects = [r for r in h.of("edge-a", Reject) if r.reason == "norm_outlier"]
    assert [(r.sender, r.round) for r in rejects] == [("a5", 1), ("a5", 2)]
    (report,) = h.of("edge-a", TaskEnded)
    assert report.rejected == {"norm_outlier": 2}
    assert report.participants == ("a1", "a2", "a3", "a4")
    assert report.local_rounds == 2
    (up,) = h.of("edge-a", SendUpdate)
    assert up.num_examples == 40  # the attacker's examples are not counted
    np.testing.assert_allclose(up.weights["w"], np.full(4, 0.5))  # 2 x mean(0.1..0.4)


def test_an_edge_keeps_its_validators_history_with_its_aggregator_state() -> None:
    # The edge's checkpoint entry is its TaskEnded report: a gate with history
    # must travel in it, or a resumed edge would screen as if it were new.
    def evaluate(weights: Any) -> Any:
        loss = float(np.mean(np.asarray(weights["w"])))
        return type("R", (), {"accuracy": 0.5, "loss": loss})()

    gate = AccuracyGate(evaluate, history=1.5)
    h = Poisoned(FIVE, rounds=1, edge_rounds=2, examples=EQUAL, attacker="a5")
    with_edge(h, "edge-a", validators=[gate])
    h.start(0.0)
    h.run()
    (report,) = h.of("edge-a", TaskEnded)
    prefix = "validators/0/"
    kept = {k.removeprefix(prefix): v for k, v in report.aggregator_state.items()}
    assert set(kept) == set(gate.state_dict())
    assert set(report.aggregator_state) == {prefix + k for k in gate.state_dict()}
    assert any(k.startswith("history/a5") for k in kept)
    fresh = AccuracyGate(evaluate, history=1.5)
    load_level_state(FedAvg(), [fresh], report.aggregator_state)
    restored = fresh.state_dict()
    assert restored.keys() == gate.state_dict().keys()
    assert all(np.array_equal(v, restored[k]) for k, v in gate.state_dict().items())


def test_a_robust_aggregator_at_the_edge_absorbs_the_attacker() -> None:
    h = Poisoned(FIVE, rounds=1, examples=EQUAL, attacker="a5")
    with_edge(h, "edge-a", aggregator=make_aggregator("median"))
    h.start(0.0)
    h.run()
    (up,) = h.of("edge-a", SendUpdate)
    # two local rounds, each moving by the median step (0.1, 0.2, 0.3, 0.4, -40): 0.2
    np.testing.assert_allclose(up.weights["w"], np.full(4, 0.4))


def test_children_evaluate_the_parent_model_in_the_first_local_round_only() -> None:
    cloud = FedAvgConfig(rounds=2, min_clients=1, round_timeout_s=100.0, join_timeout_s=50.0,
                         evaluate="federated")  # fmt: skip
    h = Poisoned({"edge-a": ["a1", "a2"], "edge-b": ["b1"]}, cloud=cloud, edge_rounds=2,
                 examples={"a1": 10, "a2": 30, "b1": 20})  # fmt: skip
    h.start(0.0)
    h.run()
    asks = [(b.round, b.config.get(EVALUATE_KEY), b.config.get(TASK_KEY))
            for b in h.of("edge-a", BroadcastModel)]  # fmt: skip
    # two tasks of two local rounds, then the final evaluation-only task
    assert asks == [(1, True, "train"), (2, False, "train"), (3, True, "train"),
                    (4, False, "train"), (5, True, TASK_EVALUATE)]  # fmt: skip
    reports = h.of("edge-a", TaskEnded)
    assert [(r.kind, r.top_round) for r in reports] == [("train", 1), ("train", 2),
                                                        ("evaluate", 3)]  # fmt: skip
    # a1 reports 0.1 on 10 examples, a2 0.2 on 30: the edge's mean is sample-weighted
    for report in reports:
        assert report.evaluation["accuracy"] == pytest.approx((0.1 * 10 + 0.2 * 30) / 40)
        assert report.evaluation["num_examples"] == 40
    ups = h.of("edge-a", SendUpdate)
    assert [u.metrics["eval_num_examples"] for u in ups] == [40, 40, 40]
    assert ups[-1].weights == {}
    assert ups[-1].num_examples == 0
    # the cloud's mean is sample-weighted over the devices, not over the edges
    devices = (0.1 * 10 + 0.2 * 30 + 0.3 * 20) / 60
    closed = h.of(CLOUD, RoundClosed)
    assert closed[1].federated_metrics["accuracy"] == pytest.approx(devices)
    assert closed[1].federated_metrics["num_examples"] == 60
    (final,) = h.of(CLOUD, EvaluationClosed)
    assert final.federated_metrics["accuracy"] == pytest.approx(devices)


def test_a_region_passes_evaluation_down_to_the_devices_of_its_edges() -> None:
    cloud = FedAvgServer(
        FedAvgConfig(rounds=1, min_clients=1, round_timeout_s=100.0, evaluate="federated"),
        run=RUN, weights=initial_weights(), expected_nodes=1,
    )  # fmt: skip
    region = EdgeAggregator(EDGE_CFG, node=NodeId("region"), run=RUN, edge_rounds=1)
    edge = EdgeAggregator(EDGE_CFG, node=NodeId("edge"), run=RUN, edge_rounds=1)
    region.handle(Started(), now=0.0)
    edge.handle(Started(), now=0.0)
    region.handle(NodeJoined(node=NodeId("edge"), num_examples=0), now=0.0)
    edge.handle(NodeJoined(node=NodeId("d"), num_examples=7), now=0.0)
    cloud.handle(Started(), now=0.0)
    (down,) = [c for c in cloud.handle(NodeJoined(node=NodeId("region"), num_examples=0), now=0.0)
               if isinstance(c, BroadcastModel)]  # fmt: skip
    model = ModelReceived(run=RUN, round=down.round, weights=down.weights, selected=True,
                          config=down.config, model_id=down.request_id)  # fmt: skip
    (to_edge,) = [c for c in region.handle(model, now=1.0) if isinstance(c, BroadcastModel)]
    assert to_edge.config[EVALUATE_KEY] is True
    assert to_edge.config[TOP_ROUND_KEY] == 1
    model = ModelReceived(run=RUN, round=to_edge.round, weights=to_edge.weights, selected=True,
                          config=to_edge.config, model_id=to_edge.request_id)  # fmt: skip
    (to_device,) = [c for c in edge.handle(model, now=1.0) if isinstance(c, BroadcastModel)]
    assert to_device.config[EVALUATE_KEY] is True


def test_task_report_carries_the_restart_point_and_a_restarted_edge_goes_on_from_it() -> None:
    h = Hierarchy({"edge-a": ["a1"]}, rounds=2, edge_rounds=3)
    with_edge(h, "edge-a", aggregator=make_aggregator({"kind": "fedavgm", "momentum": 0.5}))
    h.start(0.0)
    h.run()
    first, second = h.of("edge-a", TaskEnded)
    assert (first.local_base, second.local_base) == (2, 4)  # with_edge: edge_rounds=2
    assert first.aggregator_state  # FedAvgM's momentum buffer
    # an edge restarted from the first report numbers its local rounds on from there
    restarted = EdgeAggregator(EDGE_CFG, node=NodeId("edge-a"), run=RUN, edge_rounds=2,
                               local_base=first.local_base)  # fmt: skip
    restarted.handle(Started(), now=0.0)
    restarted.handle(NodeJoined(node=NodeId("a1"), num_examples=10), now=0.0)
    out = restarted.handle(
        ModelReceived(run=RUN, round=2, weights=initial_weights(), selected=True), now=1.0
    )
    assert [b.round for b in out if isinstance(b, BroadcastModel)] == [3]


def test_evaluation_only_round_with_no_children_reports_no_examples() -> None:
    edge = EdgeAggregator(EDGE_CFG, node=NodeId("e"), run=RUN)
    edge.handle(Started(), now=0.0)
    model = ModelReceived(run=RUN, round=4, weights=initial_weights(), selected=True,
                          config={TASK_KEY: TASK_EVALUATE, EVALUATE_KEY: True})  # fmt: skip
    out = edge.handle(model, now=1.0)
    assert not any(isinstance(c, Evaluate) for c in out)
    (report,) = [c for c in out if isinstance(c, TaskEnded)]
    assert report.kind == "evaluate"
    assert report.evaluation == {}
    (up,) = [c for c in out if isinstance(c, SendUpdate)]
    assert up.metrics == {"eval_num_examples": 0.0}

"""Transcript tests of the FedAvg server, through the Federation harness."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from harness import RUN, Federation, initial_weights

from fedbus._types import NodeId, RunId
from fedbus.aggregation import AggregationError, ClientUpdate, FedAvg
from fedbus.errors import LocalProtocolError
from fedbus.protocols.fedavg import (
    BroadcastModel,
    FedAvgConfig,
    FedAvgServer,
    Finish,
    NodeJoined,
    NodeLeft,
    PublishManifest,
    Reject,
    RoundClosed,
    RoundFailed,
    SenderMismatched,
    ServerCheckpoint,
    ServerState,
    Started,
    Tick,
    UpdateFailed,
    UpdateReceived,
)

ABC = ["a", "b", "c"]


def cfg(**kw: Any) -> FedAvgConfig:
    base: dict[str, Any] = {"rounds": 3, "min_clients": 1, "round_timeout_s": 10.0,
                            "join_timeout_s": 5.0}  # fmt: skip
    return FedAvgConfig(**{**base, **kw})


def update(sender: str, round_: int, **kw: Any) -> UpdateReceived:
    fields: dict[str, Any] = {"sender": NodeId(sender), "run": RUN, "round": round_,
                              "weights": initial_weights(), "num_examples": 5}  # fmt: skip
    return UpdateReceived(**{**fields, **kw})


# --- joining ----------------------------------------------------------------------


def test_round_one_waits_for_the_expected_nodes() -> None:
    fed = Federation(ABC, config=cfg(), expected_nodes=3)
    fed.start(0.0, join=["a", "b"])
    assert fed.of(BroadcastModel) == []
    assert fed.server.state is ServerState.WAITING_FOR_NODES
    assert fed.server.next_deadline() == 5.0
    fed.join("c", 1.0)
    (first,) = fed.of(BroadcastModel)
    assert (first.round, first.selected) == (1, ("a", "b", "c"))
    assert fed.server.next_deadline() == 11.0


def test_join_timeout_starts_with_the_quorum() -> None:
    fed = Federation(ABC, config=cfg(min_clients=2), expected_nodes=3)
    fed.start(0.0, join=["a", "b"])
    fed.tick(4.9)
    assert fed.of(BroadcastModel) == []
    fed.tick(5.0)
    assert fed.of(BroadcastModel)[0].selected == ("a", "b")


def test_join_timeout_below_quorum_finishes_with_a_reason() -> None:
    fed = Federation(ABC, config=cfg(min_clients=2), expected_nodes=3)
    fed.start(0.0, join=["a"])
    fed.tick(6.0)
    (finish,) = fed.of(Finish)
    assert not finish.success
    assert "below min_clients=2" in finish.reason
    assert "before round 1" in finish.reason
    assert fed.server.state is ServerState.FINISHED
    assert fed.server.next_deadline() is None
    assert fed.manifest is not None
    assert fed.manifest.state == "finished"


def test_without_expected_nodes_clients_per_round_is_the_target() -> None:
    fed = Federation(ABC, config=cfg(clients_per_round=2), expected_nodes=None)
    fed.start(0.0, join=["a", "b"])
    assert len(fed.of(BroadcastModel)) == 1


def test_with_fraction_and_no_target_the_server_waits_for_the_deadline() -> None:
    fed = Federation(ABC, config=cfg(fraction=0.5), expected_nodes=None)
    fed.start(0.0)
    assert fed.of(BroadcastModel) == []
    fed.tick(5.0)
    assert len(fed.of(BroadcastModel)[0].selected) == 1  # floor(0.5 * 3), as in McMahan et al.


def test_nodes_joined_before_started_count() -> None:
    fed = Federation(ABC, config=cfg(), expected_nodes=2)
    fed.to_server(NodeJoined(node=NodeId("a")), 0.0)
    fed.to_server(NodeJoined(node=NodeId("b")), 0.0)
    assert fed.server.state is ServerState.IDLE
    fed.to_server(Started(), 0.0)
    assert fed.server.state is ServerState.COLLECTING


# --- full rounds ----------------------------------------------------------------------


def test_full_run_aggregates_sample_weighted_and_finishes() -> None:
    fed = Federation(ABC, config=cfg(rounds=2), examples={"a": 1, "b": 1, "c": 2})
    fed.start(0.0)
    fed.run_rounds(2)
    closed = fed.of(RoundClosed)
    assert [c.round for c in closed] == [1, 2]
    # round 1: (1*1 + 1*2 + 2*3) / 4 = 2.25 on top of zeros
    np.testing.assert_array_equal(closed[0].weights["w"], np.full((2, 3), 2.25, np.float32))
    np.testing.assert_array_equal(closed[1].weights["b"], np.full(3, 4.5, np.float32))
    assert closed[0].participants == ("a", "b", "c")
    assert closed[0].dropped == ()
    assert closed[0].num_examples == 4
    assert closed[0].client_metrics == {"loss": 2.25}
    assert closed[0].federated_metrics == {}
    assert closed[0].aggregator_state == {}
    (finish,) = fed.of(Finish)
    assert finish.success
    assert finish.completed_round == 2
    assert fed.server.completed_round == 2
    assert fed.server.weights["w"].dtype == np.float32


def test_selection_is_seeded_per_round_and_attempt() -> None:
    names = [f"n{i:02d}" for i in range(20)]

    def selections(seed: int) -> list[tuple[str, ...]]:
        fed = Federation(names, config=cfg(rounds=4, clients_per_round=5, seed=seed))
        fed.start(0.0)
        fed.run_rounds(4)
        return [b.selected for b in fed.of(BroadcastModel)]

    first = selections(7)
    assert first == selections(7)
    assert first != selections(8)
    assert len(set(first)) > 1
    assert all(len(s) == 5 and list(s) == sorted(s) for s in first)


def test_fraction_rounds_up_but_not_past_float_noise() -> None:
    fed = Federation([f"n{i}" for i in range(10)], config=cfg(fraction=0.3), expected_nodes=10)
    fed.start(0.0)
    assert len(fed.of(BroadcastModel)[0].selected) == 3


# --- deadlines, quorum, retries ----------------------------------------------------


def test_deadline_closes_with_the_quorum_and_reports_the_silent_as_dropped() -> None:
    fed = Federation(ABC, config=cfg(min_clients=2))
    fed.start(0.0)
    fed.finish_tasks(1.0, only=["a", "b"])
    assert fed.of(RoundClosed) == []
    fed.tick(10.0)
    (closed,) = fed.of(RoundClosed)
    assert closed.participants == ("a", "b")
    assert closed.dropped == ("c",)
    assert fed.of(BroadcastModel)[-1].round == 2


def test_late_update_after_the_deadline_is_stale() -> None:
    fed = Federation(ABC, config=cfg(min_clients=2))
    fed.start(0.0)
    fed.finish_tasks(1.0, only=["a", "b"])
    fed.finish_tasks(10.5, only=["c"])  # the deadline passes before c's update is judged
    closed = fed.of(RoundClosed)
    assert closed[0].participants == ("a", "b")
    assert [(r.sender, r.round, r.reason) for r in fed.of(Reject)] == [("c", 1, "stale_round")]


def test_below_quorum_retries_with_a_fresh_selection_then_gives_up() -> None:
    fed = Federation(ABC, config=cfg(min_clients=2, clients_per_round=2, max_round_retries=1))
    fed.start(0.0)
    fed.tick(10.0)  # nobody answered
    failed = fed.of(RoundFailed)
    assert [(f.round, f.attempt) for f in failed] == [(1, 1)]
    broadcasts = fed.of(BroadcastModel)
    assert [(b.round, b.attempt) for b in broadcasts] == [(1, 1), (1, 2)]
    assert broadcasts[0].request_id != broadcasts[1].request_id
    fed.tick(20.0)
    (finish,) = fed.of(Finish)
    assert not finish.success
    assert "max_round_retries=1" in finish.reason
    assert "failed 2 attempt" in finish.reason


def test_retry_keeps_answers_of_reselected_nodes() -> None:
    names = [f"n{i}" for i in range(6)]
    fed = Federation(names, config=cfg(min_clients=3, clients_per_round=3, seed=1))
    fed.start(0.0)
    first = fed.of(BroadcastModel)[0].selected
    fed.finish_tasks(1.0, only=first[:1])
    fed.tick(10.0)
    second = fed.of(BroadcastModel)[-1]
    assert second.attempt == 2
    fed.finish_tasks(11.0)
    closed = fed.of(RoundClosed)
    if first[0] in second.selected:
        assert closed
        assert first[0] in closed[0].participants
    else:
        assert all(first[0] not in c.participants for c in closed)


def test_quorum_unreachable_fails_the_attempt_early() -> None:
    fed = Federation(ABC, config=cfg(min_clients=3, max_round_retries=0))
    fed.start(0.0)
    fed.finish_tasks(1.0, only=["a"], fail=["a"])
    (failed,) = fed.of(RoundFailed)
    assert "quorum unreachable" in failed.reason
    assert failed.answered == ("a",)
    assert not fed.of(Finish)[0].success


def test_node_left_mid_round_closes_early_when_the_rest_answered() -> None:
    fed = Federation(ABC, config=cfg(min_clients=2))
    fed.start(0.0)
    fed.finish_tasks(1.0, only=["a", "b"])
    fed.leave("c", 2.0)
    (closed,) = fed.of(RoundClosed)
    assert closed.dropped == ("c",)
    assert fed.of(BroadcastModel)[-1].selected == ("a", "b")  # c is no longer selected


def test_too_few_live_nodes_between_rounds_waits_then_resumes() -> None:
    fed = Federation(ABC, config=cfg(min_clients=3))
    fed.start(0.0)
    fed.finish_tasks(1.0, only=["a", "b"])
    fed.leave("c", 2.0)  # round 1 becomes hopeless, and only 2 nodes stay live
    assert fed.server.state is ServerState.WAITING_FOR_NODES
    assert fed.server.next_deadline() == 7.0
    fed.join("c", 3.0)
    assert fed.server.state is ServerState.COLLECTING
    assert fed.of(BroadcastModel)[-1].attempt == 2


def test_waiting_mid_run_times_out_with_a_reason() -> None:
    fed = Federation(ABC, config=cfg(min_clients=3))
    fed.start(0.0)
    fed.leave("c", 2.0)
    fed.tick(7.0)
    (finish,) = fed.of(Finish)
    assert not finish.success
    assert "for round 1" in finish.reason


# --- rejects -------------------------------------------------------------------------------


def test_every_reject_reason_is_counted_and_never_aggregated() -> None:
    fed = Federation(ABC, config=cfg(rounds=2, min_clients=1, clients_per_round=2, seed=3))
    fed.start(0.0)
    selected = fed.of(BroadcastModel)[0].selected
    (outsider,) = set(ABC) - set(selected)
    good, other = selected
    fed.to_server(update(good, 1, run=RunId("other-run")), 1.0)
    fed.to_server(update(good, 0), 1.0)
    fed.to_server(update(good, 2), 1.0)
    fed.to_server(update(outsider, 1), 1.0)
    fed.to_server(update(good, 1, weights={"w": np.zeros((3, 2), np.float32),
                                           "b": np.zeros(3, np.float32)}), 1.0)  # fmt: skip
    fed.to_server(update(good, 1, weights={"w": np.zeros((2, 3)), "b": np.zeros(3)}), 1.0)
    fed.to_server(update(good, 1, weights={"w": np.zeros((2, 3), np.float32)}), 1.0)
    bad = initial_weights()
    bad["b"][0] = np.nan
    fed.to_server(update(good, 1, weights=bad), 1.0)
    fed.to_server(update(good, 1, num_examples=0), 1.0)
    fed.to_server(update(good, 1, encoding="sparse"), 1.0)
    fed.to_server(SenderMismatched(node=NodeId(good), claimed="x", run=RUN, round=1), 1.0)
    fed.to_server(update(good, 1, update_id="u1"), 1.0)
    fed.to_server(update(good, 1, update_id="u2"), 1.0)  # second update from good
    fed.to_server(update(other, 1, update_id="u1"), 1.0)  # a re-delivered message id
    fed.to_server(UpdateFailed(sender=NodeId(outsider), run=RUN, round=1), 1.0)
    fed.to_server(update(other, 1), 1.0)
    reasons = [r.reason for r in fed.of(Reject)]
    assert reasons == ["foreign_run", "stale_round", "future_round", "unselected"] + [
        "invalid"] * 6 + ["sender_mismatch", "duplicate", "duplicate", "unselected"]  # fmt: skip
    (closed,) = fed.of(RoundClosed)
    assert closed.participants == tuple(sorted(selected))
    assert closed.rejected == {"duplicate": 2, "foreign_run": 1, "future_round": 1,
                               "invalid": 6, "sender_mismatch": 1, "stale_round": 1,
                               "unselected": 2}  # fmt: skip
    np.testing.assert_array_equal(closed.weights["w"], np.zeros((2, 3), np.float32))
    fed.to_server(update(good, 1), 2.0)  # round 1 is closed now
    assert fed.of(Reject)[-1].reason == "stale_round"
    assert fed.of(RoundClosed)[-1].round == 1


def test_invalid_tensors_are_named_in_the_reject() -> None:
    # The tensor checks run against a signature cached per global model:
    # each bad update is still caught, and the model after a close is checked too.
    fed = Federation(ABC, config=cfg(rounds=2, min_clients=1, clients_per_round=3, seed=3))
    fed.start(0.0)
    a, b, c = fed.of(BroadcastModel)[0].selected
    inf, nan = initial_weights(), initial_weights()
    inf["w"][1, 2] = -np.inf
    nan["b"][2] = np.nan
    reordered = dict(reversed(initial_weights().items()))
    extra = {**initial_weights(), "extra": np.zeros(1, np.float32)}
    for bad in (inf, nan, reordered, extra):
        fed.to_server(update(b, 1, weights=bad), 1.0)
    details = [r.detail for r in fed.of(Reject)]
    assert details == ["w: contains NaN or infinity", "b: contains NaN or infinity"] + [
        "tensor names differ from the global model's"] * 2  # fmt: skip
    for sender in (a, b, c):
        fed.to_server(update(sender, 1), 1.0)
    (closed,) = fed.of(RoundClosed)
    assert closed.participants == tuple(sorted((a, b, c)))
    assert closed.rejected == {"invalid": 4}
    fed.to_server(update(a, 2, weights={"w": np.zeros((3, 2), np.float32),
                                        "b": np.zeros(3, np.float32)}), 2.0)  # fmt: skip
    assert fed.of(Reject)[-1].detail == "w: float32[3, 2] where the global model has float32[2, 3]"


def test_updates_outside_an_open_round_are_stale_or_future() -> None:
    fed = Federation(ABC, config=cfg(), expected_nodes=3)
    fed.to_server(update("a", 1), 0.0)  # IDLE: round 1 has not begun
    fed.start(0.0, join=["a"])
    fed.to_server(update("a", 2), 0.5)
    assert [r.reason for r in fed.of(Reject)] == ["stale_round", "future_round"]


def test_validators_reject_with_their_reason() -> None:
    class NoA:
        def validate(self, global_weights: Any, updates: Any, *, round: int) -> dict[str, str]:
            return {"a": "norm_outlier"}

    fed = Federation(ABC, config=cfg(rounds=1), validators=[NoA()])
    fed.start(0.0)
    fed.finish_tasks(1.0)
    (closed,) = fed.of(RoundClosed)
    assert closed.participants == ("b", "c")
    assert closed.dropped == ("a",)
    assert closed.rejected == {"norm_outlier": 1}


def test_an_aggregation_error_fails_the_attempt() -> None:
    class Refuses(FedAvg):
        def aggregate(self, global_weights: Any, updates: Any, *, round: int) -> Any:
            raise AggregationError("needs n >= 4f+3")

    fed = Federation(ABC, config=cfg(max_round_retries=0), aggregator=Refuses())
    fed.start(0.0)
    fed.finish_tasks(1.0)
    assert "needs n >= 4f+3" in fed.of(RoundFailed)[0].reason
    assert not fed.of(Finish)[0].success


# --- late joiners, resume, federated evaluation --------------------------------------


def test_late_joiner_learns_the_round_from_the_manifest() -> None:
    fed = Federation([*ABC, "late"], config=cfg(rounds=3), expected_nodes=3)
    fed.start(0.0, join=ABC)
    fed.run_rounds(1)
    fed.join("late", 1.5)
    assert fed.clients["late"].current_round == 2
    fed.run_rounds(1, start=1.5)
    assert "late" in fed.of(BroadcastModel)[-1].selected  # round 3 selects it
    manifests = fed.of(PublishManifest)
    assert [m.round for m in manifests if m.state == "collecting"] == [1, 2, 3]


def test_resume_continues_with_the_next_round_and_the_same_selection() -> None:
    names = [f"n{i}" for i in range(8)]
    config = cfg(rounds=4, clients_per_round=3, seed=5)
    whole = Federation(names, config=config)
    whole.start(0.0)
    whole.run_rounds(4)
    after_two = whole.of(RoundClosed)[1]
    checkpoint = ServerCheckpoint(round=2, weights=after_two.weights,
                                  aggregator_state=after_two.aggregator_state)  # fmt: skip
    server = FedAvgServer.from_checkpoint(config, checkpoint, run=RUN, expected_nodes=8)
    resumed = Federation(names, config=config, server=server)
    resumed.start(0.0)
    resumed.run_rounds(2)
    assert [b.round for b in resumed.of(BroadcastModel)] == [3, 4]
    assert [b.selected for b in resumed.of(BroadcastModel)] == [
        b.selected for b in whole.of(BroadcastModel)[2:]
    ]
    for name in ("w", "b"):
        np.testing.assert_array_equal(
            resumed.of(RoundClosed)[-1].weights[name], whole.of(RoundClosed)[-1].weights[name]
        )


class _CountingValidator:
    """A stateful validator: counts the rounds it screened (like the gate's history)."""

    def __init__(self) -> None:
        self.seen = 0

    def validate(self, global_weights: Any, updates: Any, *, round: int) -> dict[str, str]:
        self.seen += 1
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"seen": np.array([self.seen], np.int64)}

    def load_state_dict(self, state: Any) -> None:
        self.seen = int(state["seen"][0])


def test_checkpoints_keep_stateful_validators_and_resume_restores_them() -> None:
    config = cfg(rounds=3)
    whole = Federation(ABC, config=config, validators=[_CountingValidator()])
    whole.start(0.0)
    whole.run_rounds(2)
    closed = whole.of(RoundClosed)[-1]
    assert {k: v.tolist() for k, v in closed.aggregator_state.items()} == {"validators/0/seen": [2]}
    restored = _CountingValidator()
    checkpoint = ServerCheckpoint(round=2, weights=closed.weights,
                                  aggregator_state=closed.aggregator_state)  # fmt: skip
    FedAvgServer.from_checkpoint(config, checkpoint, run=RUN, validators=[restored])
    assert restored.seen == 2
    # a checkpoint from before validator state was kept restores none
    old = ServerCheckpoint(round=2, weights=closed.weights)
    fresh = _CountingValidator()
    FedAvgServer.from_checkpoint(config, old, run=RUN, validators=[fresh])
    assert fresh.seen == 0


def test_resume_of_a_finished_run_finishes_at_once() -> None:
    checkpoint = ServerCheckpoint(round=3, weights=initial_weights())
    server = FedAvgServer.from_checkpoint(cfg(rounds=3), checkpoint, run=RUN)
    assert [type(c) for c in server.handle(Started(), now=0.0)] == [PublishManifest, Finish]


def test_federated_evaluation_weights_metrics_by_eval_examples() -> None:
    fed = Federation(["a", "b"], config=cfg(rounds=1, evaluate="federated"),
                     examples={"a": 1, "b": 3})  # fmt: skip
    fed.start(0.0)
    assert fed.of(BroadcastModel)[0].config == {"task": "train", "evaluate": True}
    fed.finish_tasks(1.0)  # evaluations
    fed.finish_tasks(2.0)  # trainings
    (closed,) = fed.of(RoundClosed)
    assert closed.federated_metrics == pytest.approx(
        {"accuracy": (0.5 * 1 + 0.6 * 3) / 4, "loss": 1.0, "num_examples": 4.0}
    )
    assert "eval_accuracy" not in closed.client_metrics
    final = fed.of(BroadcastModel)[-1]
    assert (final.round, final.config["task"]) == (2, "evaluate")
    assert fed.server.state is ServerState.EVALUATING
    fed.finish_tasks(3.0)
    evaluation = fed.of(Finish)[0]
    assert evaluation.success
    closed_eval = fed.sent[-3]
    assert closed_eval.round == 1
    assert closed_eval.participants == ("a", "b")
    assert closed_eval.federated_metrics["accuracy"] == pytest.approx(0.575)


def test_final_evaluation_closes_at_its_deadline_or_when_nodes_leave() -> None:
    fed = Federation(ABC, config=cfg(rounds=1, evaluate="federated"))
    fed.start(0.0)
    fed.finish_tasks(1.0)
    fed.finish_tasks(2.0)
    fed.finish_tasks(3.0, only=["a"])
    fed.leave("b", 4.0)
    assert fed.server.state is ServerState.EVALUATING
    fed.tick(12.0)
    assert fed.of(Finish)[0].success
    fed2 = Federation(ABC, config=cfg(rounds=1, evaluate="federated"))
    fed2.start(0.0)
    fed2.finish_tasks(1.0)
    fed2.finish_tasks(2.0)
    fed2.finish_tasks(3.0, only=["a", "b"])
    fed2.leave("c", 4.0)
    assert fed2.of(Finish)[0].success


# --- misuse ------------------------------------------------------------------------------


def test_starting_twice_is_a_local_protocol_error_and_error_is_terminal() -> None:
    server = FedAvgServer(cfg(), run=RUN, weights=initial_weights())
    server.handle(Started(), now=0.0)
    with pytest.raises(LocalProtocolError, match="illegal in state WAITING_FOR_NODES"):
        server.handle(Started(), now=1.0)
    assert server.state is ServerState.ERROR
    assert server.next_deadline() is None
    with pytest.raises(LocalProtocolError, match="ERROR"):
        server.handle(Tick(), now=2.0)


def test_time_going_backwards_is_a_local_protocol_error() -> None:
    server = FedAvgServer(cfg(), run=RUN, weights=initial_weights())
    server.handle(Started(), now=5.0)
    with pytest.raises(LocalProtocolError, match="backwards"):
        server.handle(NodeLeft(node=NodeId("a")), now=4.0)
    assert server.state is ServerState.ERROR


def test_constructor_checks_and_properties() -> None:
    with pytest.raises(ValueError, match="expected_nodes"):
        FedAvgServer(cfg(), run=RUN, weights=initial_weights(), expected_nodes=0)
    with pytest.raises(ValueError, match="completed_round"):
        FedAvgServer(cfg(), run=RUN, weights=initial_weights(), completed_round=-1)
    server = FedAvgServer(cfg(), run=RUN, weights=initial_weights(), expected_nodes=1)
    server.handle(Started(), now=0.0)
    server.handle(NodeJoined(node=NodeId("a")), now=0.0)
    assert server.selected == {"a"}
    assert server.live_nodes == {"a"}
    assert server.current_round == 1


def test_client_update_carries_numeric_metrics_only() -> None:
    seen: list[ClientUpdate] = []

    class Spy(FedAvg):
        def aggregate(self, global_weights: Any, updates: Any, *, round: int) -> Any:
            seen.extend(updates)
            return super().aggregate(global_weights, updates, round=round)

    server = FedAvgServer(cfg(rounds=1), run=RUN, weights=initial_weights(), aggregator=Spy(),
                          expected_nodes=1)  # fmt: skip
    server.handle(Started(), now=0.0)
    server.handle(NodeJoined(node=NodeId("a")), now=0.0)
    server.handle(update("a", 1, metrics={"loss": 1, "tag": "x", "ok": True}), now=1.0)
    assert seen[0].metrics == {"loss": 1.0}


class _Recording(FedAvg):
    """FedAvg that keeps what it was asked to aggregate."""

    def __init__(self) -> None:
        self.seen: list[list[ClientUpdate]] = []

    def aggregate(
        self, global_weights: Any, updates: Any, *, round: int
    ) -> dict[str, np.ndarray[Any, Any]]:
        self.seen.append(list(updates))
        return super().aggregate(global_weights, updates, round=round)


def test_updates_prepared_on_arrival_are_what_the_aggregator_gets() -> None:
    # The server builds each accepted update's ClientUpdate as it arrives (issue 3's
    # overhead); the aggregator must still get plain arrays, numeric metrics as
    # floats, sorted senders, and the same result for array-likes as for arrays.
    from fedbus.messages import Tensor

    agg = _Recording()
    server = FedAvgServer(cfg(rounds=1, min_clients=2), run=RUN, weights=initial_weights(),
                          aggregator=agg, expected_nodes=2)  # fmt: skip
    server.handle(Started(), now=0.0)
    for name in ("b", "a"):
        server.handle(NodeJoined(node=NodeId(name), num_examples=5), now=0.1)
    ones = {k: np.ones_like(v) for k, v in initial_weights().items()}
    as_tensors = {k: Tensor.from_array(np.full_like(v, 3)) for k, v in initial_weights().items()}
    metrics: dict[str, Any] = {"train_loss": 2, "note": "x", "flag": True}
    server.handle(update("b", 1, weights=as_tensors, num_examples=1, metrics=metrics), now=1.0)
    out = server.handle(update("a", 1, weights=ones, num_examples=3), now=2.0)
    (closed,) = [c for c in out if isinstance(c, RoundClosed)]
    (seen,) = agg.seen
    assert [u.sender for u in seen] == ["a", "b"]
    assert all(type(a) is np.ndarray for u in seen for a in u.weights.values())
    assert seen[1].metrics == {"train_loss": 2.0}
    np.testing.assert_array_equal(closed.weights["b"], np.full(3, 1.5, np.float32))

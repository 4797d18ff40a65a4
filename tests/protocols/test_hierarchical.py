"""Transcript tests of the edge aggregator and re-homing, through the Hierarchy harness."""

from __future__ import annotations

import numpy as np
import pytest
from hier_harness import CLOUD, RUN, Hierarchy, initial_weights

from fedbus._types import NodeId
from fedbus.errors import LocalProtocolError
from fedbus.protocols.fedavg import (
    BroadcastModel,
    FedAvgConfig,
    ManifestReceived,
    ModelReceived,
    NodeJoined,
    PublishManifest,
    Reject,
    RoundClosed,
    RoundFailed,
    SendFailure,
    SendUpdate,
    Started,
    Stop,
    Tick,
    Train,
    UpdateReceived,
)
from fedbus.protocols.hierarchical import EdgeAggregator, EdgeState
from fedbus.protocols.hierarchical_client import HierarchicalClient
from fedbus.protocols.hierarchical_rehoming import (
    TOP_ROUND_KEY,
    ParentHeard,
    ParentLost,
    RehomeConfig,
    RehomeState,
    Rehoming,
    Stranded,
    SwitchParent,
    fallback_chain,
)

TWO_EDGES = {"edge-a": ["a1", "a2"], "edge-b": ["b1", "b2", "b3"]}
A_TOTAL, B_TOTAL = 10 + 20, 30 + 40 + 50


def cloud_rounds(h: Hierarchy) -> list[tuple[int, tuple[str, ...], int]]:
    return [(c.round, c.participants, c.num_examples) for c in h.of(CLOUD, RoundClosed)]


# --- edge rounds and accounting -------------------------------------------------------


def test_edge_runs_edge_rounds_local_rounds_per_global_round() -> None:
    h = Hierarchy(TWO_EDGES, rounds=3, edge_rounds=2)
    h.start(0.0)
    h.run()
    assert [c[0] for c in cloud_rounds(h)] == [1, 2, 3]
    for edge in ("edge-a", "edge-b"):
        assert [c.round for c in h.of(edge, RoundClosed)] == [1, 2, 3, 4, 5, 6]
        ups = h.of(edge, SendUpdate)
        assert [u.round for u in ups] == [1, 2, 3]
        assert all(u.metrics["edge_rounds"] == 2 for u in ups)
    # every local model names the cloud round it serves
    tops = [b.config[TOP_ROUND_KEY] for b in h.of("edge-a", BroadcastModel)]
    assert tops == [1, 1, 2, 2, 3, 3]
    # the run's end reaches the devices: the edge forwards a finished manifest
    assert all(any(isinstance(c, Stop) for c in h.sent[d]) for d in h.devices)
    assert h.machines["edge-a"].state is EdgeState.DONE


def test_sample_counts_are_summed_upward_once_per_child() -> None:
    h = Hierarchy(TWO_EDGES, rounds=2, edge_rounds=3)
    h.start(0.0)
    h.run()
    assert [u.num_examples for u in h.of("edge-a", SendUpdate)] == [A_TOTAL, A_TOTAL]
    assert [u.num_examples for u in h.of("edge-b", SendUpdate)] == [B_TOTAL, B_TOTAL]
    assert cloud_rounds(h) == [
        (1, ("edge-a", "edge-b"), A_TOTAL + B_TOTAL),
        (2, ("edge-a", "edge-b"), A_TOTAL + B_TOTAL),
    ]


def test_edge_model_is_the_fedavg_of_its_devices() -> None:
    h = Hierarchy({"edge-a": ["a1", "a2"]}, rounds=1, edge_rounds=1)
    h.start(0.0)
    h.run()
    (up,) = h.of("edge-a", SendUpdate)
    # a1 adds 1 (10 examples), a2 adds 2 (20 examples): (10*1 + 20*2) / 30
    np.testing.assert_allclose(up.weights["w"], np.full(4, 50 / 30))
    assert up.metrics["loss"] == pytest.approx(50 / 30)


def test_edge_deadline_and_quorum_are_its_own() -> None:
    edge_cfg = FedAvgConfig(min_clients=2, round_timeout_s=5.0, join_timeout_s=5.0)
    h = Hierarchy(TWO_EDGES, rounds=1, edge_rounds=1, edge_configs={"edge-b": edge_cfg})
    h.start(0.0)
    h.finish_tasks(1.0, only=["a1", "a2", "b1", "b2"])  # b3 is a straggler
    assert h.of("edge-b", RoundClosed) == []
    h.tick(5.0)  # edge-b's deadline, far before the cloud's (100 s)
    (closed,) = h.of("edge-b", RoundClosed)
    assert closed.participants == ("b1", "b2")
    assert closed.dropped == ("b3",)
    (up,) = h.of("edge-b", SendUpdate)
    assert up.num_examples == 30 + 40
    assert cloud_rounds(h) == [(1, ("edge-a", "edge-b"), A_TOTAL + 70)]


def test_edge_missing_its_quorum_fails_upward_and_the_cloud_closes_without_it() -> None:
    strict = FedAvgConfig(min_clients=3, round_timeout_s=5.0, join_timeout_s=5.0,
                          max_round_retries=0)  # fmt: skip
    h = Hierarchy(TWO_EDGES, rounds=1, edge_rounds=2, edge_configs={"edge-b": strict})
    h.start(0.0)
    h.finish_tasks(1.0, only=["a1", "a2", "b1"])
    h.finish_tasks(2.0, only=["a1", "a2"])
    h.tick(6.0)
    assert h.of("edge-b", RoundFailed)
    (failure,) = h.of("edge-b", SendFailure)
    assert "edge-b" in failure.reason
    assert cloud_rounds(h) == [(1, ("edge-a",), A_TOTAL)]


def test_partial_progress_goes_up_when_a_later_local_round_fails() -> None:
    cfg = FedAvgConfig(min_clients=2, round_timeout_s=5.0, join_timeout_s=5.0, max_round_retries=0)
    h = Hierarchy({"edge-a": ["a1", "a2"]}, rounds=1, edge_rounds=2, edge_configs={"edge-a": cfg})
    h.start(0.0)
    h.finish_tasks(1.0)  # local round 1 closes
    h.finish_tasks(2.0, only=["a1"])
    h.tick(7.0)  # local round 2 misses its quorum
    (up,) = h.of("edge-a", SendUpdate)
    assert up.metrics["edge_rounds"] == 1
    assert up.num_examples == 30


def test_local_rounds_continue_after_a_parent_round_moves_on() -> None:
    h = Hierarchy(TWO_EDGES, rounds=3, edge_rounds=2,
                  cloud=FedAvgConfig(rounds=3, min_clients=1, round_timeout_s=3.0))  # fmt: skip
    h.start(0.0)
    h.finish_tasks(1.0, only=["b1", "b2", "b3"])
    h.finish_tasks(1.5, only=["b1", "b2", "b3"])  # edge-b done; edge-a's devices stall
    h.tick(3.0)  # the cloud closes round 1 with edge-b and starts round 2
    edge = h.machines["edge-a"]
    assert isinstance(edge, EdgeAggregator)
    assert edge.local_base == 2  # the aborted task used up local rounds 1..2
    assert [b.round for b in h.of("edge-a", BroadcastModel)][-1] == 3
    h.run(start=4.0)
    assert [c[0] for c in cloud_rounds(h)] == [1, 2, 3]
    assert cloud_rounds(h)[-1][2] == A_TOTAL + B_TOTAL


def test_update_from_a_child_between_tasks_is_rejected_as_data() -> None:
    edge = EdgeAggregator(FedAvgConfig(), node=NodeId("e"), run=RUN)
    edge.handle(Started(), now=0.0)
    out = edge.handle(
        UpdateReceived(sender=NodeId("x"), run=RUN, round=1, weights=initial_weights(),
                       num_examples=3),
        now=1.0,
    )  # fmt: skip
    assert [(c.sender, c.reason) for c in out if isinstance(c, Reject)] == [("x", "stale_round")]


def test_parent_events_before_started_are_our_bug() -> None:
    edge = EdgeAggregator(FedAvgConfig(), node=NodeId("e"), run=RUN)
    model = ModelReceived(run=RUN, round=1, weights=initial_weights(), selected=True)
    with pytest.raises(LocalProtocolError):
        edge.handle(model, now=0.0)
    assert edge.state is EdgeState.ERROR


def test_manifests_to_children_never_say_finished_between_tasks() -> None:
    h = Hierarchy({"edge-a": ["a1"]}, rounds=2, edge_rounds=1)
    h.start(0.0)
    h.run()
    states = [m.state for m in h.of("edge-a", PublishManifest)]
    assert states.count("finished") == 1
    assert states[-1] == "finished"


# --- an edge dies -----------------------------------------------------------------------


@pytest.mark.parametrize("rehome", ["parent", "sibling"])
def test_edge_killed_mid_run_devices_rehome_within_two_rounds(rehome: str) -> None:
    h = Hierarchy(TWO_EDGES, rounds=4, edge_rounds=2, rehome=rehome)
    h.start(0.0)
    now = 1.0
    h.finish_tasks(now)
    h.finish_tasks(now + 0.5)  # global round 1 closes with both edges
    h.finish_tasks(now + 1.0)  # global round 2, local round 1
    h.kill("edge-a", now + 1.5)  # edge-a dies mid global round 2
    target = CLOUD if rehome == "parent" else "edge-b"
    assert h.parent["a1"] == target
    assert h.parent["a2"] == target
    h.run(start=3.0)
    rounds = cloud_rounds(h)
    assert [r[0] for r in rounds] == [1, 2, 3, 4]
    assert rounds[0][2] == A_TOTAL + B_TOTAL
    assert rounds[1] == (2, ("edge-b",), B_TOTAL)  # edge-a's part of round 2 is lost
    # from round 3 on (within two global rounds) the devices count again, exactly once
    for r in rounds[2:]:
        assert r[2] == A_TOTAL + B_TOTAL
    if rehome == "parent":
        assert rounds[2][1] == ("a1", "a2", "edge-b")
    else:
        assert rounds[2][1] == ("edge-b",)
        assert [u.num_examples for u in h.of("edge-b", SendUpdate)][2:] == [A_TOTAL + B_TOTAL] * 2


def test_no_double_counting_when_the_edge_dies_after_sending_its_update() -> None:
    h = Hierarchy(TWO_EDGES, rounds=2, edge_rounds=3, rehome="sibling")
    h.start(0.0)
    h.finish_tasks(1.0)
    h.finish_tasks(1.2, only=["a1", "a2"])
    h.finish_tasks(1.4, only=["a1", "a2"])  # edge-a sent round 1; edge-b is in local round 2
    assert [u.round for u in h.of("edge-a", SendUpdate)] == [1]
    h.kill("edge-a", 2.0)
    assert h.parent["a1"] == "edge-b"
    h.finish_tasks(2.5)  # edge-b's local round 3, still cloud round 1, selects a1 and a2
    # they were counted in cloud round 1 through edge-a: they refuse at once
    refusals = h.of("a1", SendFailure)
    assert refusals
    assert "top-level round 1" in refusals[0].reason
    h.finish_tasks(2.7)
    third = h.of("edge-b", RoundClosed)[2]
    assert (third.round, third.participants) == (3, ("b1", "b2", "b3"))
    h.run(start=3.0)
    rounds = cloud_rounds(h)
    assert rounds[0] == (1, ("edge-a", "edge-b"), A_TOTAL + B_TOTAL)
    assert rounds[1] == (2, ("edge-b",), A_TOTAL + B_TOTAL)


def test_silent_edge_is_detected_by_the_watchdog() -> None:
    h = Hierarchy(TWO_EDGES, rounds=4, edge_rounds=1, parent_timeout_s=30.0)
    h.start(0.0)
    h.finish_tasks(1.0)
    h.kill("edge-a", 2.0, will=False)  # no last will: only silence tells
    h.tick(20.0)
    assert h.parent["a1"] == "edge-a"
    h.tick(31.0)  # 30 s after the devices last heard edge-a (the model of round 2 at t=1)
    assert h.parent["a1"] == CLOUD
    assert any(isinstance(c, SwitchParent) and "no message" in c.reason for c in h.sent["a1"])
    h.run(start=32.0)
    assert cloud_rounds(h)[-1][2] == A_TOTAL + B_TOTAL


def test_edge_rehomes_itself_and_its_children_keep_training() -> None:
    policy = Rehoming(RehomeConfig(fallbacks=(NodeId("cloud"),)), parent=NodeId("region"))
    edge = EdgeAggregator(FedAvgConfig(min_clients=1), node=NodeId("e"), run=RUN, rehoming=policy)
    edge.handle(Started(), now=0.0)
    edge.handle(NodeJoined(node=NodeId("d"), num_examples=5), now=0.0)
    model = ModelReceived(run=RUN, round=7, weights=initial_weights(), selected=True,
                          config={TOP_ROUND_KEY: 3})  # fmt: skip
    first = edge.handle(model, now=1.0)
    assert [b.round for b in first if isinstance(b, BroadcastModel)] == [1]
    out = edge.handle(ParentLost(parent=NodeId("region")), now=2.0)
    # the aborted task still reports (per-level metrics, restart point)
    assert [type(c).__name__ for c in out] == ["TaskEnded", "PublishManifest", "SwitchParent"]
    assert edge.state is EdgeState.WAITING_FOR_PARENT
    # the cloud's round 3 was served through the region: refused; round 4 is served
    again = edge.handle(ModelReceived(run=RUN, round=3, weights=initial_weights(), selected=True),
                        now=3.0)  # fmt: skip
    assert [type(c).__name__ for c in again] == ["SendFailure"]
    later = edge.handle(ModelReceived(run=RUN, round=4, weights=initial_weights(), selected=True),
                        now=4.0)  # fmt: skip
    assert [b.round for b in later if isinstance(b, BroadcastModel)] == [2]  # local rounds go on


# --- re-homing policy ---------------------------------------------------------------------


def test_fallback_chains() -> None:
    sib = [NodeId(s) for s in ("e1", "e2", "e3")]
    assert fallback_chain("parent", parent=sib[1], grandparent=NodeId("c"), siblings=sib) == ("c",)
    chain = fallback_chain("sibling", parent=sib[1], grandparent=NodeId("c"), siblings=sib)
    assert chain == ("e3", "e1", "c")
    last = fallback_chain("sibling", parent=sib[2], grandparent=NodeId("c"), siblings=sib)
    assert last == ("e1", "e2", "c")


def test_rehoming_walks_the_chain_then_strands() -> None:
    policy = Rehoming(RehomeConfig(fallbacks=(NodeId("e2"), NodeId("c"))), parent=NodeId("e1"))
    policy.handle(Started(), now=0.0)
    assert policy.handle(ParentLost(parent=NodeId("other")), now=1.0) == []
    (first,) = policy.handle(ParentLost(parent=NodeId("e1")), now=1.0)
    assert first == SwitchParent(parent=NodeId("e2"), previous=NodeId("e1"), reason="parent left")
    (second,) = policy.handle(ParentLost(parent=NodeId("e2"), reason="will"), now=2.0)
    assert isinstance(second, SwitchParent)
    assert second.parent == "c"
    (stuck,) = policy.handle(ParentLost(parent=NodeId("c")), now=3.0)
    assert isinstance(stuck, Stranded)
    assert policy.state is RehomeState.STRANDED
    assert policy.history == ("e1", "e2", "c")
    assert policy.handle(Tick(), now=4.0) == []


def test_watchdog_rearms_on_every_message() -> None:
    policy = Rehoming(RehomeConfig(fallbacks=(NodeId("c"),), parent_timeout_s=10.0),
                      parent=NodeId("e"))  # fmt: skip
    policy.handle(Started(), now=0.0)
    assert policy.next_deadline() == 10.0
    policy.handle(ParentHeard(parent=NodeId("e")), now=8.0)
    assert policy.handle(Tick(), now=12.0) == []
    (switch,) = policy.handle(Tick(), now=18.0)
    assert isinstance(switch, SwitchParent)
    with pytest.raises(LocalProtocolError):
        policy.handle(Tick(), now=1.0)
    assert policy.state is RehomeState.ERROR


def test_device_cancels_its_task_on_switch_and_drops_the_stale_result() -> None:
    policy = Rehoming(RehomeConfig(fallbacks=(NodeId("c"),)), parent=NodeId("e"))
    device = HierarchicalClient(run=RUN, rehoming=policy)
    device.handle(Started(), now=0.0)
    out = device.handle(
        ModelReceived(run=RUN, round=5, weights=initial_weights(), selected=True,
                      config={TOP_ROUND_KEY: 2}),
        now=1.0,
    )  # fmt: skip
    assert [type(c) for c in out] == [Train]
    out = device.handle(ParentLost(parent=NodeId("e")), now=2.0)
    assert [type(c).__name__ for c in out] == ["CancelTraining", "SwitchParent"]
    assert device.parent == "c"
    from fedbus.protocols.fedavg import TrainingDone

    late = TrainingDone(round=5, weights=initial_weights(), num_examples=3)
    assert device.handle(late, now=3.0) == []
    # the cloud's round 2 was being served through e: refused at once, round 3 trained
    refused = device.handle(
        ModelReceived(run=RUN, round=2, weights=initial_weights(), selected=True), now=4.0
    )
    assert [type(c) for c in refused] == [SendFailure]
    taken = device.handle(
        ModelReceived(run=RUN, round=3, weights=initial_weights(), selected=True), now=5.0
    )
    assert [type(c) for c in taken] == [Train]
    assert device.handle(ManifestReceived(run=RUN, round=3, state="collecting"), now=6.0) == []


def test_rehome_config_validates() -> None:
    from fedbus.errors import ConfigError

    with pytest.raises(ConfigError):
        RehomeConfig(parent_timeout_s=0.0)
    with pytest.raises(ValueError, match="edge_rounds"):
        EdgeAggregator(FedAvgConfig(), node=NodeId("e"), run=RUN, edge_rounds=0)

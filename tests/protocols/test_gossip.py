"""Transcript tests of the gossip peers (Metropolis-Hastings and push-sum)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import numpy as np
import pytest
from gossip_harness import RUN, Network, circulant, ring

from fedbus._types import NodeId, RunId
from fedbus.errors import ConfigError, LocalProtocolError
from fedbus.protocols.fedavg import (
    Finish,
    Reject,
    Started,
    Tick,
    Train,
    TrainingDone,
    TrainingFailed,
)
from fedbus.protocols.gossip import GossipPeer, PeerState
from fedbus.protocols.gossip_pushsum import PushSumPeer, PushSumState
from fedbus.protocols.gossip_types import (
    GossipConfig,
    NeighbourDropped,
    NeighbourJoined,
    NeighbourLost,
    PeerModelReceived,
    Rejoined,
    RoundMixed,
    SendModel,
)
from fedbus.protocols.mixing import consensus_distance

MH = GossipConfig(rounds=30, round_timeout_s=5.0, join_timeout_s=5.0)


def run_sync(net: Network, rounds: int, *, start: float = 1.0) -> list[float]:
    """Finish every round's training; return the consensus distance after each round."""
    distances = [net.distance()]
    now = start
    for _ in range(rounds):
        net.finish_tasks(now)
        distances.append(net.distance())
        now += 1.0
    return distances


# --- synchronous Metropolis-Hastings ----------------------------------------------------


@pytest.mark.parametrize("adjacency", [ring(8), circulant(12, [1, 5])], ids=["ring", "regular"])
def test_mh_mixing_reaches_consensus_on_the_average(adjacency: dict[str, Any]) -> None:
    net = Network(adjacency, config=MH)
    net.start(0.0)
    distances = run_sync(net, 30)
    assert all(b < a for a, b in itertools.pairwise(distances))
    assert distances[-1] < 0.05 * distances[0]
    mean = np.mean(list(net.values.values()))
    for model in net.models():
        np.testing.assert_allclose(model["w"], mean, atol=0.05 * distances[0])
    # the network average is kept exactly (doubly stochastic mixing)
    np.testing.assert_allclose(np.mean([m["w"] for m in net.models()], axis=0), mean)
    assert all(isinstance(net.of(p, Finish)[0], Finish) for p in net.peers)
    assert net.mixed_rounds("p0") == list(range(1, 31))


def test_round_waits_for_neighbours_then_closes_at_its_deadline() -> None:
    net = Network(ring(4), config=MH)
    net.start(0.0)
    net.finish_tasks(1.0, only=["p0", "p1", "p3"])  # p2 trains slowly
    assert net.mixed_rounds("p0") == [1]  # both its neighbours (p1, p3) answered at once
    assert net.mixed_rounds("p1") == []  # p1 and p3 wait for p2
    assert net.peers["p1"].state is PeerState.COLLECTING
    net.tick(6.0)  # round deadlines (5 s after sending) pass
    assert net.mixed_rounds("p1") == [1]
    (mixed,) = net.of("p1", RoundMixed)
    assert mixed.missing == ("p2",)
    # the missing neighbour's weight goes to the self weight: rows still sum to one
    assert sum(mixed.coefficients.values()) == pytest.approx(1.0)
    assert mixed.coefficients["p1"] == pytest.approx(1 - 1 / 3)
    assert any(d.node == "p2" for d in net.of("p1", NeighbourDropped))


def test_peer_loss_and_clean_rejoin() -> None:
    config = GossipConfig(rounds=12, round_timeout_s=5.0, join_timeout_s=5.0)
    net = Network(ring(6), config=config)
    net.start(0.0)
    run_sync(net, 2)
    now = 3.0
    net.kill("p3", now)
    assert all("p3" not in net.peers[q].active_neighbours for q in ("p2", "p4"))
    for _ in range(4):  # the others go on without waiting for p3
        net.finish_tasks(now)
        now += 1.0
    assert net.mixed_rounds("p2")[-1] == 6
    assert net.mixed_rounds("p3") == [1, 2]
    net.revive("p3", now)  # p3 is back, still at round 3 with its old model
    assert "p3" in net.peers["p2"].active_neighbours
    net.finish_tasks(now)  # p3 sends a round-3 model: stale for p2 and p4
    stale = [r for r in net.of("p2", Reject) if r.sender == "p3"]
    assert stale
    assert stale[0].reason == "stale_round"
    for _ in range(3):
        now += 1.0
        net.tick(now)
        net.finish_tasks(now)
    # p3 jumped to its neighbours' round instead of replaying the rounds it missed
    assert net.peers["p3"].current_round >= 7
    rounds3 = net.mixed_rounds("p3")
    assert rounds3 == sorted(set(rounds3))
    for _ in range(10):
        now += 1.0
        net.finish_tasks(now)
        net.tick(now)
    assert all(net.peers[p].state is PeerState.FINISHED for p in net.peers)
    assert net.distance() < 1.0  # everyone mixed again, p3 included


def test_final_mixing_rounds_mix_without_training_and_keep_the_average() -> None:
    config = GossipConfig(rounds=2, final_mixing_rounds=6, round_timeout_s=5.0)
    net = Network(ring(6), config=config)
    mean = np.mean([m["w"] for m in net.models()], axis=0)
    net.start(0.0)
    distances = run_sync(net, 2)  # the two training rounds (mixing only: no bump)
    # the consensus phase runs with no training: nothing left to finish
    assert not net.tasks
    assert all(net.peers[p].state is PeerState.FINISHED for p in net.peers)
    assert all(net.mixed_rounds(p) == list(range(1, 9)) for p in net.peers)
    assert all(len(net.of(p, Train)) == 2 for p in net.peers)
    after_training = consensus_distance([net.of(p, RoundMixed)[1].weights for p in net.peers])
    assert distances[0] > after_training > 0
    assert net.distance() < 0.5 * after_training
    np.testing.assert_allclose(np.mean([m["w"] for m in net.models()], axis=0), mean)
    last = net.of("p0", RoundMixed)[-1]
    assert last.round == 8
    assert last.metrics == {"mixing_only": 1}
    # one model per neighbour in every round, the mixing-only ones included
    assert len(net.of("p0", SendModel)) == 8


def test_lr_decays_per_round() -> None:
    config = GossipConfig(rounds=3, lr_decay=0.5, train_config={"lr": 0.1, "epochs": 1})
    net = Network(ring(3), config=config)
    net.start(0.0)
    run_sync(net, 3)
    lrs = [t.config["lr"] for t in net.of("p0", Train)]
    assert lrs == pytest.approx([0.1, 0.05, 0.025])
    assert [t.config["epochs"] for t in net.of("p0", Train)] == [1, 1, 1]


def test_rejoin_sync_adopts_the_neighbours_average_and_their_round() -> None:
    config = GossipConfig(rounds=12, round_timeout_s=5.0, join_timeout_s=5.0)
    net = Network(ring(6), config=config)
    net.start(0.0)
    run_sync(net, 2)
    now = 3.0
    net.kill("p3", now)  # away while training round 3
    for _ in range(3):
        net.finish_tasks(now)
        now += 1.0
    assert net.mixed_rounds("p2")[-1] == 5
    expected = (net.peers["p2"].weights["w"] + net.peers["p4"].weights["w"]) / 2
    net.rejoin("p3", now)
    # p2 and p4 answered with snapshots of their model after round 5 (not a model to mix)
    snaps = [c for c in net.of("p2", SendModel) if c.sync]
    assert [(c.round, c.to) for c in snaps] == [(5, ("p3",))]
    # p3 adopted their average, discarded its stale model, and trains round 6 from it
    np.testing.assert_allclose(net.peers["p3"].weights["w"], expected)
    assert net.peers["p3"].state is PeerState.TRAINING
    assert net.peers["p3"].current_round == 6
    assert net.tasks["p3"].round == 6
    assert not [r for r in net.of("p2", Reject) if r.sender == "p3"]  # nothing stale was sent
    for _ in range(8):
        net.finish_tasks(now)
        now += 1.0
        net.tick(now)
    assert all(net.peers[p].state is PeerState.FINISHED for p in net.peers)
    assert net.mixed_rounds("p3") == [1, 2, *range(6, 13)]


def test_a_peer_back_after_its_neighbours_finished_adopts_their_model_and_finishes() -> None:
    config = GossipConfig(rounds=4, round_timeout_s=5.0, join_timeout_s=5.0)
    net = Network(ring(4), config=config)
    net.start(0.0)
    run_sync(net, 1)
    net.kill("p2", 2.0)
    for i in range(4):
        net.finish_tasks(3.0 + i)
    assert all(net.peers[p].state is PeerState.FINISHED for p in ("p0", "p1", "p3"))
    net.rejoin("p2", 10.0)  # finished peers still answer (the runtime lingers for it)
    assert net.peers["p2"].state is PeerState.FINISHED
    (last,) = net.of("p2", RoundMixed)[-1:]
    assert last.round == 4
    assert last.metrics == {"synced": 1}
    assert isinstance(net.of("p2", Finish)[0], Finish)


def test_a_rejoin_nobody_answers_goes_on_from_its_own_model() -> None:
    peer = _peer()
    peer.handle(Started(), now=0.0)
    peer.handle(NeighbourJoined(node=NodeId("a")), now=0.0)
    peer.handle(NeighbourJoined(node=NodeId("b")), now=0.0)
    out = peer.handle(Rejoined(answered=frozenset()), now=1.0)
    assert [type(c) for c in out] == [Train]
    assert peer.state is PeerState.TRAINING


def test_a_neighbour_dropped_at_a_deadline_still_gets_our_models() -> None:
    peer = _peer()
    peer.handle(Started(), now=0.0)
    peer.handle(NeighbourJoined(node=NodeId("a")), now=0.0)
    peer.handle(NeighbourJoined(node=NodeId("b")), now=0.0)
    peer.handle(TrainingDone(round=1, weights={"w": np.ones(3)}, num_examples=1), now=1.0)
    peer.handle(model("a", 1), now=2.0)
    out = peer.handle(Tick(), now=10.0)  # b missed round 1: dropped, no longer waited for
    assert any(isinstance(c, NeighbourDropped) and c.node == "b" for c in out)
    assert "b" not in peer.active_neighbours
    out = peer.handle(TrainingDone(round=2, weights={"w": np.ones(3)}, num_examples=1), now=11.0)
    (send,) = [c for c in out if isinstance(c, SendModel)]
    assert send.to == ("a", "b")  # but it still gets our model: its next one brings it back
    peer.handle(model("b", 2), now=11.5)
    assert "b" in peer.active_neighbours
    # a neighbour whose will came is not sent to until it is back
    peer.handle(NeighbourLost(node=NodeId("a"), reason="connection lost"), now=11.6)
    out = peer.handle(TrainingDone(round=3, weights={"w": np.ones(3)}, num_examples=1), now=12.0)
    (send,) = [c for c in out if isinstance(c, SendModel)]
    assert send.to == ("b",)


def _peer(**kw: Any) -> GossipPeer:
    base: dict[str, Any] = {
        "node": NodeId("me"), "run": RUN, "weights": {"w": np.zeros(3)},
        "neighbours": {NodeId("a"): 2, NodeId("b"): 2},
    }  # fmt: skip
    return GossipPeer(kw.pop("config", MH), **{**base, **kw})


def model(sender: str, round_: int, value: float = 1.0, **kw: Any) -> PeerModelReceived:
    fields: dict[str, Any] = {"sender": NodeId(sender), "run": RUN, "round": round_,
                              "weights": {"w": np.full(3, value)}, "degree": 2}  # fmt: skip
    return PeerModelReceived(**{**fields, **kw})


def test_stale_duplicate_foreign_and_bad_models_are_rejected_as_data() -> None:
    peer = _peer()
    peer.handle(Started(), now=0.0)
    peer.handle(NeighbourJoined(node=NodeId("a")), now=0.0)
    peer.handle(NeighbourJoined(node=NodeId("b")), now=0.0)
    assert peer.state is PeerState.TRAINING
    assert peer.current_round == 1
    assert peer.handle(model("a", 1), now=0.5) == []
    cases = {
        "duplicate": model("a", 1),
        "foreign_run": model("a", 1, run=RunId("other")),
        "not_neighbour": model("zz", 1),
        "invalid": model("b", 1, weights={"w": np.zeros(4)}),
    }
    for reason, event in cases.items():
        (reject,) = peer.handle(event, now=1.0)
        assert isinstance(reject, Reject), reason
        assert reject.reason == reason
    (bad_degree,) = peer.handle(model("b", 1, degree=7), now=1.0)
    assert isinstance(bad_degree, Reject)
    assert "degree" in bad_degree.detail
    (nan,) = peer.handle(model("b", 1, weights={"w": np.full(3, np.nan)}), now=1.0)
    assert isinstance(nan, Reject)
    assert nan.reason == "invalid"
    out = peer.handle(TrainingDone(round=1, weights={"w": np.zeros(3)}, num_examples=1), now=2.0)
    assert [type(c) for c in out] == [SendModel]
    out = peer.handle(model("b", 1, value=4.0), now=2.5)  # the last one: mix, round 2
    mixed = next(c for c in out if isinstance(c, RoundMixed))
    np.testing.assert_allclose(mixed.weights["w"], np.full(3, (1.0 + 4.0) / 3))
    (old,) = peer.handle(model("a", 1), now=3.0)
    assert isinstance(old, Reject)
    assert old.reason == "stale_round"
    assert peer.handle(model("a", 3), now=3.0) == []  # kept for later
    (dup_ahead,) = peer.handle(model("a", 3), now=3.0)
    assert isinstance(dup_ahead, Reject)
    assert dup_ahead.reason == "duplicate"


def test_failed_training_still_mixes_the_untrained_model() -> None:
    peer = _peer(neighbours={})
    out = peer.handle(Started(), now=0.0)
    assert [type(c) for c in out] == [Train]
    out = peer.handle(TrainingFailed(round=1, reason="boom"), now=1.0)
    mixed = next(c for c in out if isinstance(c, RoundMixed))
    assert mixed.metrics == {"training_failed": 1}
    assert peer.current_round == 2


def test_misuse_is_a_local_protocol_error() -> None:
    peer = _peer()
    with pytest.raises(LocalProtocolError):
        peer.handle(TrainingDone(round=1, weights={}, num_examples=1), now=0.0)
    assert peer.state is PeerState.ERROR
    with pytest.raises(LocalProtocolError):
        peer.handle(Tick(), now=1.0)
    other = _peer()
    other.handle(Started(), now=5.0)
    with pytest.raises(LocalProtocolError, match="backwards"):
        other.handle(Tick(), now=1.0)


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        GossipConfig(rounds=0)
    with pytest.raises(ConfigError):
        GossipConfig(mixing="average")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        GossipConfig(fanout=0)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="lr_decay"):
            GossipConfig(lr_decay=bad)
    with pytest.raises(ConfigError, match="final_mixing_rounds"):
        GossipConfig(final_mixing_rounds=-1)
    assert GossipConfig(rounds=3, final_mixing_rounds=2).total_rounds == 5
    with pytest.raises(ValueError, match="push_sum"):
        _peer(config=GossipConfig(mixing="push_sum"))


# --- push-sum -------------------------------------------------------------------------


PS = GossipConfig(rounds=60, mixing="push_sum", round_timeout_s=1.0)


def directed(n: int) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """I -> i+1 and i -> i+3: strongly connected, not symmetric."""
    ids = [f"p{i}" for i in range(n)]
    out = {ids[i]: tuple(sorted({ids[(i + 1) % n], ids[(i + 3) % n]})) for i in range(n)}
    ins: dict[str, list[str]] = {p: [] for p in ids}
    for p, targets in out.items():
        for q in targets:
            ins[q].append(p)
    return out, {p: tuple(sorted(v)) for p, v in ins.items()}


def run_push_sum(net: Network, steps: int, *, start: float = 0.0) -> list[float]:
    distances, now = [net.distance()], start
    for _ in range(steps):
        net.finish_tasks(now)
        now += 1.0
        net.tick(now)
        distances.append(net.distance())
    return distances


def test_push_sum_on_a_directed_graph_converges_to_the_true_average() -> None:
    out, ins = directed(9)
    net = Network(out, in_adjacency=ins, config=PS)
    net.start(0.0)
    distances = run_push_sum(net, 60)
    mean = np.mean(list(net.values.values()))
    for m in net.models():
        np.testing.assert_allclose(m["w"], mean, rtol=1e-6)
    assert distances[-1] < 1e-6 * distances[0]
    total = sum(p.mass for p in net.peers.values() if isinstance(p, PushSumPeer))
    assert total + net.in_flight_mass == pytest.approx(9.0)
    assert all(isinstance(net.of(p, Finish)[0], Finish) for p in net.peers)


def test_push_sum_with_fanout_is_a_time_varying_graph_and_still_averages() -> None:
    config = GossipConfig(rounds=80, mixing="push_sum", round_timeout_s=1.0, fanout=1)
    net = Network(circulant(8, [1, 2]), config=config, seed=3)
    net.start(0.0)
    run_push_sum(net, 80)
    mean = np.mean(list(net.values.values()))
    for m in net.models():
        np.testing.assert_allclose(m["w"], mean, rtol=1e-4)


def test_push_sum_training_moves_the_estimate_by_the_trainers_step() -> None:
    peer = PushSumPeer(PS, node=NodeId("me"), run=RUN, weights={"w": np.zeros(3)},
                       out_neighbours=[NodeId("a")], rng=random.Random(0))  # fmt: skip
    (train,) = peer.handle(Started(), now=0.0)
    assert isinstance(train, Train)
    assert peer.handle(model("a", 1, value=4.0, mass=1.0), now=0.5) == []  # mid-training share
    out = peer.handle(TrainingDone(round=1, weights={"w": np.ones(3)}, num_examples=1), now=1.0)
    (send,) = out
    assert isinstance(send, SendModel)
    assert send.mass == pytest.approx(1.0)
    # x = (0 + 4) + 2 * (1 - 0) = 6, w = 2, halved: estimate (6/2) = 3
    np.testing.assert_allclose(peer.weights["w"], np.full(3, 3.0))
    (dup,) = peer.handle(model("a", 1, mass=1.0), now=1.5)
    assert isinstance(dup, Reject)
    assert dup.reason == "duplicate"
    (bad,) = peer.handle(model("a", 2, mass=0.0), now=1.5)
    assert isinstance(bad, Reject)
    assert bad.reason == "invalid"
    (alien,) = peer.handle(model("zz", 2), now=1.5)
    assert isinstance(alien, Reject)
    assert alien.reason == "not_neighbour"


def test_push_sum_drops_a_silent_neighbour_and_takes_it_back() -> None:
    net = Network(ring(4), config=GossipConfig(rounds=20, mixing="push_sum", round_timeout_s=1.0))
    net.start(0.0)
    run_push_sum(net, 2)
    net.kill("p2", 3.0, will=False)
    run_push_sum(net, 2, start=3.0)
    assert any(d.node == "p2" for d in net.of("p1", NeighbourDropped))
    assert net.peers["p1"].state is PushSumState.TRAINING
    net.revive("p2", 10.0)
    run_push_sum(net, 30, start=10.0)
    assert all(net.peers[p].state is PushSumState.FINISHED for p in net.peers)
    assert net.distance() < 1e-3  # a consensus, though not the exact average: mass was lost

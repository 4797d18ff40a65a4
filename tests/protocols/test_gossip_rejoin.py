"""Transcripts of the rejoin sync under churn: nobody waits for a snapshot that cannot come.

Measured on 16 peers with 20% churn (benchmarks/bench_topologies.py), each
of these waits cost a whole round deadline, stalled the neighbours waiting
for the syncing peer's model, and spread through the graph every few rounds:
peers trained about 40 of 60 rounds and ended 6 to 12 points below the
centralized run. Each test below fails on the machine before the fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gossip_harness import RUN, A, B, joined_peer, model, snapshot

from fedbus._types import NodeId
from fedbus.protocols.fedavg import Started, Train, TrainingDone
from fedbus.protocols.gossip import GossipPeer, PeerState
from fedbus.protocols.gossip_types import (
    GossipConfig,
    NeighbourDropped,
    NeighbourJoined,
    NeighbourLost,
    Rejoined,
    SendModel,
)

CONFIG = GossipConfig(rounds=20, round_timeout_s=5.0, join_timeout_s=5.0)


def peer_in_round_2() -> GossipPeer:
    """'me' (neighbours a, b) after round 1, training round 2 (where churn takes it away)."""
    peer = joined_peer(CONFIG)
    peer.handle(TrainingDone(round=1, weights={"w": np.ones(3)}, num_examples=1), now=0.1)
    peer.handle(model(A, 1), now=0.2)
    peer.handle(model(B, 1), now=0.3)
    assert peer.current_round == 2
    assert peer.state is PeerState.TRAINING
    return peer


def sends(out: list[Any], *, sync: bool) -> list[SendModel]:
    return [c for c in out if isinstance(c, SendModel) and c.sync is sync]


def test_a_neighbour_back_at_the_same_time_is_not_waited_for_and_gets_our_adopted_model() -> None:
    peer = peer_in_round_2()
    # Prepare: both a and b answered our Joins; b's own Join says it is back too
    peer.handle(Rejoined(answered=frozenset({A, B})), now=10.0)
    # Execute
    out_b = peer.handle(NeighbourJoined(node=B, wants_model=True), now=10.0)
    out_a = peer.handle(snapshot(A, 7, value=4.0), now=10.1)
    # Assert: synced on a's snapshot alone, before any deadline
    assert out_b == []
    assert peer.state is PeerState.TRAINING
    np.testing.assert_allclose(peer.weights["w"], 4.0)
    (train,) = [c for c in out_a if isinstance(c, Train)]
    assert train.round == 8
    # b, syncing when it asked, gets the adopted model, labelled with a's round
    (owed,) = sends(out_a, sync=True)
    assert owed.to == (B,)
    assert owed.round == 7
    np.testing.assert_allclose(owed.weights["w"], 4.0)


def test_a_neighbour_lost_during_the_sync_is_not_waited_for() -> None:
    peer = peer_in_round_2()
    peer.handle(Rejoined(answered=frozenset({A, B})), now=10.0)
    peer.handle(snapshot(A, 5, value=2.0), now=10.1)
    assert peer.state is PeerState.SYNCING  # b's snapshot is still expected
    out = peer.handle(NeighbourLost(node=B, reason="connection lost"), now=10.2)
    assert any(isinstance(c, NeighbourDropped) and c.node == B for c in out)
    assert [c.round for c in out if isinstance(c, Train)] == [6]
    np.testing.assert_allclose(peer.weights["w"], 2.0)


def test_a_rejoin_whose_only_answer_was_a_returning_neighbour_still_pays_its_debt() -> None:
    peer = peer_in_round_2()
    peer.handle(Rejoined(answered=frozenset({B})), now=10.0)
    out = peer.handle(NeighbourJoined(node=B, wants_model=True), now=10.0)
    # nobody left to wait for: it goes on from its own model, and b gets it
    assert [c.round for c in out if isinstance(c, Train)] == [2]
    (owed,) = sends(out, sync=True)
    assert owed.to == (B,)


def test_a_returning_neighbour_gets_our_model_of_the_round_in_progress() -> None:
    peer = peer_in_round_2()
    peer.handle(NeighbourLost(node=B, reason="connection lost"), now=1.0)
    out = peer.handle(TrainingDone(round=2, weights={"w": np.full(3, 3.0)}, num_examples=1),
                      now=1.1)  # fmt: skip
    assert [c.to for c in sends(out, sync=False)] == [(A,)]  # b was away: not sent to
    # Execute: b is back (its Join) while we wait for round 2's models
    out = peer.handle(NeighbourJoined(node=B, wants_model=True), now=1.2)
    # Assert: its snapshot (after round 1) and our round-2 model, so that b,
    # resuming behind us, sees we moved on instead of waiting its deadline for us
    (snap,) = sends(out, sync=True)
    assert (snap.round, snap.to) == (1, (B,))
    (current,) = sends(out, sync=False)
    assert (current.round, current.to) == (2, (B,))
    np.testing.assert_allclose(current.weights["w"], 3.0)


def test_a_join_before_round_1_is_done_is_answered_with_the_initial_model() -> None:
    peer = GossipPeer(CONFIG, node=NodeId("me"), run=RUN, weights={"w": np.zeros(3)},
                      neighbours={A: 2, B: 2})  # fmt: skip
    peer.handle(Started(), now=0.0)
    peer.handle(NeighbourJoined(node=A), now=0.0)
    peer.handle(NeighbourJoined(node=B), now=0.0)
    assert peer.state is PeerState.TRAINING
    out = peer.handle(NeighbourJoined(node=B, wants_model=True), now=0.5)
    (snap,) = sends(out, sync=True)
    assert snap.round == 0
    np.testing.assert_allclose(snap.weights["w"], 0.0)

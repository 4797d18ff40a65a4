"""Transcripts of churn around the end of a run: the consensus phase and finished neighbours.

Measured on 16 peers with 20% churn (benchmarks/bench_topologies.py): two
adjacent peers whose other neighbours were away ran through all 10
mixing-only rounds alone in 20 ms, the rest jumped to the last round on
their final models and ended 15 points apart (consensus distance rising
0.24 -> 0.25); and a peer back from churn whose neighbour had finished
meanwhile waited a whole round deadline for that neighbour's model. Each
test below fails on the machine before the fix.
"""

from __future__ import annotations

import numpy as np
from gossip_harness import A, B, joined_peer, model, snapshot

from fedbus.protocols.fedavg import Finish, Tick, Train, TrainingDone
from fedbus.protocols.gossip import GossipPeer, PeerState
from fedbus.protocols.gossip_types import (
    GossipConfig,
    NeighbourDropped,
    NeighbourJoined,
    NeighbourLost,
    Rejoined,
    RoundMixed,
    SendModel,
)


def started(config: GossipConfig) -> GossipPeer:
    """'me' (neighbours a and b, both joined), training round 1."""
    peer = joined_peer(config)
    assert peer.state is PeerState.TRAINING
    return peer


def mixed(out: list[object]) -> list[int]:
    return [c.round for c in out if isinstance(c, RoundMixed)]


# --- the consensus phase waits once for an away neighbour ------------------------------


def in_consensus_phase_with_b_away() -> GossipPeer:
    """After training round 1 of 1, b lost (churn), waiting in mixing-only round 2."""
    config = GossipConfig(rounds=1, final_mixing_rounds=3, round_timeout_s=5.0)
    peer = started(config)
    peer.handle(NeighbourLost(node=B, reason="connection lost"), now=0.1)
    peer.handle(TrainingDone(round=1, weights={"w": np.ones(3)}, num_examples=1), now=0.2)
    out = peer.handle(model(A, 1), now=0.3)
    assert mixed(out) == [1]  # a training round does not wait for b
    assert peer.current_round == 2
    assert peer.state is PeerState.COLLECTING
    return peer


def test_a_mixing_only_round_waits_for_an_away_neighbour_until_its_deadline() -> None:
    peer = in_consensus_phase_with_b_away()
    # Execute: a's model of round 2 is in; b, away, is not
    out = peer.handle(model(A, 2), now=0.4)
    # Assert: no early close (before the fix: mixed at once, and the next rounds too)
    assert mixed(out) == []
    assert peer.current_round == 2
    assert peer.handle(Tick(), now=4.9) == []
    out = peer.handle(Tick(), now=5.4)  # the round deadline (set at 0.3)
    assert mixed(out) == [2]
    # Assert: b is not waited for a second time
    out = peer.handle(model(A, 3), now=5.5)
    assert mixed(out) == [3]


def test_an_away_neighbour_back_in_the_consensus_phase_takes_part() -> None:
    peer = in_consensus_phase_with_b_away()
    peer.handle(model(A, 2), now=0.4)
    # Execute: b is back (its Join) before the deadline
    out = peer.handle(NeighbourJoined(node=B, wants_model=True), now=1.0)
    # Assert: b gets our snapshot and our round-2 model, and its round-2 model is mixed
    assert sorted((c.round, c.sync) for c in out if isinstance(c, SendModel)) == [
        (1, True), (2, False),
    ]  # fmt: skip
    out = peer.handle(model(B, 2, value=7.0), now=1.1)
    (row,) = [c for c in out if isinstance(c, RoundMixed)]
    assert (row.round, row.mixed_with) == (2, (A, B))


def test_training_rounds_still_do_not_wait_for_an_away_neighbour() -> None:
    config = GossipConfig(rounds=3, final_mixing_rounds=2, round_timeout_s=5.0)
    peer = started(config)
    peer.handle(NeighbourLost(node=B, reason="connection lost"), now=0.1)
    peer.handle(TrainingDone(round=1, weights={"w": np.ones(3)}, num_examples=1), now=0.2)
    out = peer.handle(model(A, 1), now=0.3)
    assert mixed(out) == [1]
    assert [c.round for c in out if isinstance(c, Train)] == [2]


def test_a_neighbour_that_left_cleanly_is_not_waited_for_in_the_consensus_phase() -> None:
    config = GossipConfig(rounds=1, final_mixing_rounds=2, round_timeout_s=5.0)
    peer = started(config)
    peer.handle(NeighbourLost(node=B, reason="finished"), now=0.1)
    peer.handle(TrainingDone(round=1, weights={"w": np.ones(3)}, num_examples=1), now=0.2)
    peer.handle(model(A, 1), now=0.3)
    out = peer.handle(model(A, 2), now=0.4)
    assert mixed(out) == [2]


# --- a neighbour that finished while we were away ------------------------------------


def test_a_late_snapshot_of_a_finished_neighbour_is_not_waited_for() -> None:
    config = GossipConfig(rounds=10, round_timeout_s=5.0)
    peer = started(config)
    peer.handle(TrainingDone(round=1, weights={"w": np.ones(3)}, num_examples=1), now=0.1)
    peer.handle(model(A, 1), now=0.2)
    peer.handle(model(B, 1), now=0.2)
    assert peer.current_round == 2  # churn takes it away when round 2 starts
    # Back: only a answered in time; the sync ends on a's snapshot (round 6)
    peer.handle(Rejoined(answered=frozenset({A})), now=9.0)
    out = peer.handle(snapshot(A, 6, value=2.0), now=9.1)
    assert [c.round for c in out if isinstance(c, Train)] == [7]
    # Then b's answer: it finished while we were away (its Leave went out then)
    peer.handle(NeighbourJoined(node=B), now=9.2)
    out = peer.handle(snapshot(B, 10, value=3.0), now=9.2)
    assert [c.node for c in out if isinstance(c, NeighbourDropped)] == [B]
    # Assert: round 7 closes on a's model, not at the deadline (before the fix: b
    # stayed waited for, and the round ended only at 14.1)
    peer.handle(TrainingDone(round=7, weights={"w": np.ones(3)}, num_examples=1), now=9.3)
    out = peer.handle(model(A, 7), now=9.4)
    assert mixed(out) == [7]
    out = peer.handle(TrainingDone(round=8, weights={"w": np.ones(3)}, num_examples=1), now=9.5)
    assert [c.to for c in out if isinstance(c, SendModel)] == [(A,)]  # b gets no more


def test_a_late_snapshot_of_an_unfinished_neighbour_changes_nothing() -> None:
    config = GossipConfig(rounds=10, round_timeout_s=5.0)
    peer = started(config)
    out = peer.handle(snapshot(B, 4, value=3.0), now=0.1)
    assert out == []
    assert peer.active_neighbours == {A, B}


def test_a_finished_neighbour_in_the_sync_still_finishes_us_in_step() -> None:
    config = GossipConfig(rounds=10, round_timeout_s=5.0)
    peer = started(config)
    peer.handle(Rejoined(answered=frozenset({B})), now=1.0)
    out = peer.handle(snapshot(B, 10, value=3.0), now=1.1)
    assert peer.state is PeerState.FINISHED
    assert any(isinstance(c, Finish) for c in out)
    np.testing.assert_allclose(peer.weights["w"], 3.0)

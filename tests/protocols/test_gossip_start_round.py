"""A resumed gossip peer (``start_round``) goes on after its checkpoint's round."""

from __future__ import annotations

import numpy as np
from gossip_harness import RUN

from fedbus._types import NodeId
from fedbus.protocols.fedavg import Finish, Started, Train
from fedbus.protocols.gossip import GossipPeer, PeerState
from fedbus.protocols.gossip_types import GossipConfig, NeighbourJoined, SendModel

CONFIG = GossipConfig(rounds=8, final_mixing_rounds=2, round_timeout_s=5.0, join_timeout_s=5.0)
A, B = NodeId("a"), NodeId("b")


def resumed(start_round: int) -> GossipPeer:
    return GossipPeer(CONFIG, node=NodeId("me"), run=RUN, weights={"w": np.full(3, 7.0)},
                      neighbours={A: 2, B: 2}, start_round=start_round)  # fmt: skip


def test_a_resumed_peer_trains_the_round_after_its_checkpoint_from_its_model() -> None:
    peer = resumed(5)
    peer.handle(Started(), now=0.0)
    peer.handle(NeighbourJoined(node=A), now=0.0)
    (train,) = peer.handle(NeighbourJoined(node=B), now=0.0)
    assert isinstance(train, Train)
    assert train.round == 6
    np.testing.assert_array_equal(train.weights["w"], 7.0)
    # a rejoining neighbour's snapshot is labelled with the checkpoint's round
    out = peer.handle(NeighbourJoined(node=A, wants_model=True), now=0.1)
    assert [(c.round, c.sync) for c in out if isinstance(c, SendModel)] == [(5, True)]


def test_a_peer_resumed_after_its_last_round_finishes_at_once() -> None:
    peer = resumed(10)
    (finish,) = peer.handle(Started(), now=0.0)
    assert isinstance(finish, Finish)
    assert finish.completed_round == 10
    assert peer.state is PeerState.FINISHED

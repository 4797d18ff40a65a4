"""Transcripts of a gossip peer's defenses: validators and a robust rule over neighbour models."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from gossip_harness import RUN, Network, ring

from fedbus._types import NodeId
from fedbus.aggregation import CoordinateMedian, NormClipping, NormOutlier
from fedbus.protocols.fedavg import Reject, Started, TrainingDone
from fedbus.protocols.gossip import GossipPeer
from fedbus.protocols.gossip_defense import PeerDefense
from fedbus.protocols.gossip_types import (
    GossipConfig,
    NeighbourJoined,
    PeerModelReceived,
    RoundMixed,
)

CONFIG = GossipConfig(rounds=5, round_timeout_s=5.0, join_timeout_s=5.0)
NEIGHBOURS = {NodeId("a"): 3, NodeId("b"): 3, NodeId("c"): 3}


def one_round(defense: PeerDefense | None, values: dict[str, float]) -> list[Any]:
    """'me' (model 1.0) mixes one round with a, b, c sending constant models ``values``."""
    peer = GossipPeer(CONFIG, node=NodeId("me"), run=RUN, weights={"w": np.zeros(4)},
                      neighbours=NEIGHBOURS, defense=defense)  # fmt: skip
    peer.handle(Started(), now=0.0)
    for n in NEIGHBOURS:
        peer.handle(NeighbourJoined(node=n), now=0.0)
    out = peer.handle(TrainingDone(round=1, weights={"w": np.ones(4)}, num_examples=1), now=0.1)
    for sender, value in values.items():
        out += peer.handle(
            PeerModelReceived(sender=NodeId(sender), run=RUN, round=1, degree=3,
                              weights={"w": np.full(4, value)}),
            now=0.2,
        )  # fmt: skip
    return out


def mixed(out: list[Any]) -> RoundMixed:
    (m,) = [c for c in out if isinstance(c, RoundMixed)]
    return m


def test_plain_metropolis_is_dragged_by_one_byzantine_neighbour() -> None:
    m = mixed(one_round(None, {"a": 1.2, "b": 0.8, "c": 1000.0}))
    # 1/4 of the attacker's model comes in: the peer is at ~250
    assert m.weights["w"][0] == pytest.approx(0.25 * (1.0 + 1.2 + 0.8 + 1000.0))


def test_the_median_rule_ignores_one_byzantine_neighbour() -> None:
    m = mixed(one_round(PeerDefense(aggregator=CoordinateMedian()),
                        {"a": 1.2, "b": 0.8, "c": 1000.0}))  # fmt: skip
    # median of {1.0 (own), 1.2, 0.8, 1000}: the mean of the middle two
    np.testing.assert_allclose(m.weights["w"], 1.1)
    assert m.mixed_with == ("a", "b", "c")
    assert m.coefficients == {}  # not a linear mix


def test_a_norm_outlier_is_rejected_and_its_weight_stays_with_the_peer() -> None:
    out = one_round(PeerDefense(validators=(NormOutlier(),)), {"a": 1.2, "b": 0.8, "c": 1000.0})
    (reject,) = [c for c in out if isinstance(c, Reject)]
    assert (reject.sender, reject.round, reject.reason) == ("c", 1, "norm_outlier")
    m = mixed(out)
    assert m.mixed_with == ("a", "b")
    assert m.rejected == {"norm_outlier": 1}
    assert set(m.coefficients) == {"a", "b", "me"}
    assert sum(m.coefficients.values()) == pytest.approx(1.0)
    np.testing.assert_allclose(m.weights["w"], 0.5 * 1.0 + 0.25 * 1.2 + 0.25 * 0.8)


def test_without_an_outlier_the_validators_keep_every_model() -> None:
    # Equal distances from us: with three neighbours the robust spread (MAD) of
    # their distances is the second smallest deviation, so unequal honest
    # distances can already look like outliers (docs/hierarchical-gossip.md).
    out = one_round(PeerDefense(validators=(NormOutlier(),)), {"a": 1.2, "b": 0.8, "c": 1.2})
    assert not [c for c in out if isinstance(c, Reject)]
    assert mixed(out).mixed_with == ("a", "b", "c")


class NoisyRing(Network):
    """A ring of 8 whose peer p3 sends N(0, 10^2) models instead of its own (a Byzantine peer)."""

    liar = "p3"

    def __init__(self, config: GossipConfig, defense: PeerDefense | None) -> None:
        start = np.random.default_rng(1).uniform(0.0, 7.0, size=8)  # no exact ties
        super().__init__(ring(8), config=config, values={f"p{i}": v for i, v in enumerate(start)})
        for p, peer in list(self.peers.items()):
            degrees = {NodeId(q): 2 for q in self.adjacency[p]}
            self.peers[p] = GossipPeer(config, node=peer.node, run=RUN, weights=peer.weights,
                                       neighbours=degrees, defense=defense)  # fmt: skip
        self.rng = np.random.default_rng(0)

    def post(self, node: str, event: Any) -> None:
        if isinstance(event, PeerModelReceived) and event.sender == self.liar:
            noise = {"w": self.rng.normal(0.0, 10.0, size=3)}
            event = PeerModelReceived(sender=event.sender, run=RUN, round=event.round,
                                      weights=noise, degree=event.degree)  # fmt: skip
        super().post(node, event)


@pytest.mark.parametrize("rule", ["metropolis", "median", "norm_clipping"])
def test_a_ring_with_one_noise_peer(rule: str) -> None:
    """Plain mixing lets the noise in; both robust rules keep the honest peers in range.

    The median keeps them in range but stops them agreeing (on a ring it is
    a median of 3, and the values freeze); clipped gossip keeps mixing.
    """
    # Prepare: honest peers start in [0, 7]; p3 lies every round
    config = GossipConfig(rounds=40, round_timeout_s=5.0, join_timeout_s=5.0)
    aggregator = {"median": CoordinateMedian(), "norm_clipping": NormClipping()}.get(rule)
    net = NoisyRing(config, PeerDefense(aggregator=aggregator) if aggregator else None)
    honest = [p for p in net.peers if p != net.liar]

    def values() -> Any:
        return np.array([net.peers[p].weights["w"] for p in honest])

    # Execute
    net.start(0.0)
    spreads = []
    for r in range(40):
        net.finish_tasks(1.0 + r)
        spreads.append(float(np.ptp(values(), axis=0).max()))
    # Assert
    assert all(net.mixed_rounds(p) == list(range(1, 41)) for p in honest)
    inside = bool(((values() >= 0.0) & (values() <= 7.0)).all())
    if rule == "metropolis":  # the noise comes in with weight 1/3 at p2 and p4
        assert not inside
        assert spreads[-1] > 2.0
    else:
        assert inside
        assert spreads[-1] < 1.0
    if rule == "median":
        assert spreads[-1] == spreads[-11]  # frozen: no agreement beyond this
    if rule == "norm_clipping":
        assert spreads[-1] < 0.5 * spreads[9]  # still coming together after round 10
        assert spreads[-1] != spreads[-11]

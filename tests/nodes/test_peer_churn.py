"""The churn clock of a gossip peer (simulation): whose rounds it counts, and re-draws.

Measured on 16 peers with 20% churn, down 1 round (benchmarks/bench_topologies.py):
counted by the network's median round, plus a reconnection, a Join round
trip and a resync, an absence cost 2 to 3 rounds and 4.0 to 6.0 peers were
away per round instead of about 2.7; peers that happened to be present ran
ahead of their away neighbours. Now an away peer skips exactly the rounds
its neighbours run without it, and the round it comes back for is drawn
for churn while it is still away.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedbus._types import NodeId, RunId
from fedbus.launch.gossip_monitor import GossipMonitor
from fedbus.nodes.faults import FaultPlan
from fedbus.nodes.peer import PeerNode, PeerSettings
from fedbus.protocols.gossip import GossipPeer
from fedbus.protocols.gossip_types import GossipConfig, RoundMixed

RUN = RunId("run-churn")


class Clock:
    """What ``progress`` was asked: (round, neighbours) per call; returns at once."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, frozenset[str]]] = []

    async def __call__(self, round_: int, neighbours: frozenset[str]) -> None:
        self.calls.append((round_, neighbours))


def away_peer(faults: FaultPlan, clock: Clock, *, rounds: int = 6) -> PeerNode:
    """peer-0 (neighbours peer-1, peer-2), left for churn when round 2 started."""
    config = GossipConfig(rounds=rounds, final_mixing_rounds=2, round_timeout_s=5.0)

    def build(run: RunId) -> GossipPeer:
        return GossipPeer(config, node=NodeId("peer-0"), run=run, weights={"w": np.zeros(2)},
                          neighbours={NodeId("peer-1"): 2, NodeId("peer-2"): 2})  # fmt: skip

    def connect(will: Any) -> Any:
        raise AssertionError("not connected in these tests")

    settings = PeerSettings(node_id="peer-0", namespace="g", neighbours=("peer-1", "peer-2"),
                            round_timeout_s=5.0)  # fmt: skip
    node = PeerNode(build, object(), connect, settings, run=RUN, faults=faults,  # type: ignore[arg-type]
                    progress=clock)  # fmt: skip
    node._checked_round, node._down_rounds = 2, faults.churn_down_rounds
    return node


async def test_an_away_peer_waits_for_a_neighbour_to_complete_the_rounds_it_skips() -> None:
    clock = Clock()
    never = FaultPlan(node_id="peer-0", churn=1e-12, churn_down_rounds=2)
    node = away_peer(never, clock)
    await node._stay_away()
    # It skips rounds 2 and 3: back once a neighbour completed round 3 (before: the
    # network's median at round 4, so rounds 2 to 4 and the rejoin on top were lost)
    assert clock.calls == [(3, frozenset({"peer-1", "peer-2"}))]
    # Round 4, the one it is back for, was drawn now: not again when it trains it
    assert node._checked_round == 4
    assert node._check_faults(4) is False


async def test_a_peer_drawn_to_leave_again_for_its_return_round_stays_away() -> None:
    clock = Clock()
    always = FaultPlan(node_id="peer-0", churn=1.0, churn_down_rounds=1)
    node = away_peer(always, clock, rounds=4)
    await node._stay_away()
    # Drawn for rounds 3 and 4 too: it stays away through them instead of
    # reconnecting and leaving again; after the last training round (4) it returns
    # for the mixing-only rounds, where churn is not drawn
    assert [r for r, _ in clock.calls] == [2, 3, 4]
    assert node._checked_round == 4


async def test_a_crash_due_when_it_would_be_back_is_left_to_that_round() -> None:
    clock = Clock()
    crash = FaultPlan(node_id="peer-0", churn=1.0, churn_down_rounds=1, crash_round=3)
    node = away_peer(crash, clock)
    await node._stay_away()
    assert [r for r, _ in clock.calls] == [2]
    assert node._check_faults(3) is True
    assert node._exit == "crash"


async def test_the_draws_match_the_plan_round_by_round() -> None:
    """Whatever the timing, the peer is away in exactly the rounds its plan draws."""
    plan = FaultPlan(node_id="peer-0", seed=7, churn=0.5, churn_down_rounds=1)
    clock = Clock()
    node = away_peer(plan, clock, rounds=40)
    node._checked_round = 0  # from the start
    away: list[int] = []
    for round_ in range(1, 41):
        if round_ not in away and node._check_faults(round_):
            clock.calls.clear()
            await node._stay_away()
            away += [r for r, _ in clock.calls]
    assert away == [r for r in range(1, 41) if plan.leaves(r)]


# --- the launcher's side: GossipMonitor.reached -----------------------------------------


class Scores:
    def evaluate(self, weights: Any) -> Any:
        raise AssertionError("no rows in these tests")


def mixed(round_: int) -> RoundMixed:
    return RoundMixed(round=round_, weights={"w": np.zeros(2)}, mixed_with=(), missing=(),
                      coefficients={}, mass=1.0, metrics={}, rejected={})  # fmt: skip


async def test_reached_waits_for_one_running_neighbour_not_the_median() -> None:
    monitor = GossipMonitor(["a", "b", "c", "d"], Scores(), lambda row: None)  # type: ignore[arg-type]
    for peer in "acd":
        monitor.on_mixed(peer, mixed(1))
    monitor.on_gone("b", "away")
    assert monitor.neighbourhood_round({"c", "d"}) == 1
    monitor.on_mixed("c", mixed(2))
    assert monitor.neighbourhood_round({"c", "d"}) == 2
    await monitor.reached(2, {"c", "d"})  # c completed it, though the median is at 1
    assert monitor.network_round() == 1


async def test_reached_returns_when_no_neighbour_is_running() -> None:
    monitor = GossipMonitor(["a", "b", "c"], Scores(), lambda row: None)  # type: ignore[arg-type]
    monitor.on_gone("b", "away")
    monitor.on_gone("c", "crashed")
    assert monitor.neighbourhood_round({"b", "c"}) is None
    await monitor.reached(5, {"b", "c"})  # nobody to wait for: returns at once

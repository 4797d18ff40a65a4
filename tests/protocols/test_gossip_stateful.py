"""Hypothesis stateful tests of the gossip peers: random models, losses, joins, deadlines.

Remote input must only ever produce command lists; rounds never go backwards;
each neighbour's model enters at most one mix, once, in the round it names;
push-sum never adds a (sender, step) twice and conserves mass.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fedbus._types import NodeId, RunId
from fedbus.errors import ProtocolError
from fedbus.protocols.base import Command, Event
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
    NeighbourJoined,
    NeighbourLost,
    PeerModelReceived,
    RoundMixed,
    SendModel,
)

RUN = RunId("run-s")
NEIGHBOURS = [NodeId(n) for n in ("a", "b", "c")]
senders = st.sampled_from([*NEIGHBOURS, NodeId("zz")])


def weights(value: float, size: int = 3) -> dict[str, Any]:
    return {"w": np.full(size, value)}


class _Base(RuleBasedStateMachine):
    peer: GossipPeer | PushSumPeer

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.counter = 0
        self.mixed: list[RoundMixed] = []
        self.task: Train | None = None
        self.finished = False

    def feed(self, event: Event) -> list[Command]:
        try:
            out = self.peer.handle(event, now=self.now)
        except ProtocolError:  # pragma: no cover - the test fails below
            raise AssertionError(f"remote event raised: {event!r}") from None
        assert isinstance(out, list)
        assert all(isinstance(c, Command) for c in out)
        for command in out:
            assert not self.finished or isinstance(command, Reject), command
            if isinstance(command, Train):
                self.task = command
            elif isinstance(command, RoundMixed):
                self.mixed.append(command)
            elif isinstance(command, Finish):
                self.finished = True
        return out

    @rule(dt=st.floats(0.0, 4.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.feed(Tick())

    @rule(node=senders)
    def join(self, node: NodeId) -> None:
        self.feed(NeighbourJoined(node=node))

    @rule(node=senders)
    def lose(self, node: NodeId) -> None:
        self.feed(NeighbourLost(node=node))

    @precondition(lambda self: self.task is not None)
    @rule(fail=st.booleans(), bad=st.booleans())
    def finish_training(self, fail: bool, bad: bool) -> None:
        task, self.task = self.task, None
        assert task is not None
        event: Event = (
            TrainingFailed(round=task.round, reason="x") if fail
            else TrainingDone(round=task.round, weights=weights(1.0, 4 if bad else 3), num_examples=1)
        )  # fmt: skip
        self.feed(event)

    @invariant()
    def rounds_never_go_backwards(self) -> None:
        rounds = [m.round for m in self.mixed]
        assert rounds == sorted(set(rounds))
        assert self.peer.current_round >= (rounds[-1] if rounds else 0)


class GossipPeerMachine(_Base):
    def __init__(self) -> None:
        super().__init__()
        config = GossipConfig(rounds=5, round_timeout_s=3.0, join_timeout_s=2.0)
        self.peer = GossipPeer(config, node=NodeId("me"), run=RUN, weights=weights(0.0),
                               neighbours={n: 2 for n in NEIGHBOURS})  # fmt: skip
        self.accepted: dict[tuple[str, int], int] = {}

    @initialize()
    def start(self) -> None:
        self.feed(Started())

    @rule(
        node=senders,
        offset=st.integers(-2, 2),
        kind=st.sampled_from(["ok", "ok", "ok", "bad", "foreign"]),
    )
    def model(self, node: NodeId, offset: int, kind: str) -> None:
        self.counter += 1
        round_ = max(0, self.peer.current_round + offset)
        event = PeerModelReceived(
            sender=node, run=RunId("x") if kind == "foreign" else RUN, round=round_,
            weights=weights(float(self.counter), 2 if kind == "bad" else 3), degree=2,
        )  # fmt: skip
        out = self.feed(event)
        if not any(isinstance(c, Reject) and c.sender == node and c.round == round_ for c in out):
            key = (node, round_)
            assert key not in self.accepted, f"{key} accepted twice"
            self.accepted[key] = self.counter

    @invariant()
    def mixes_only_what_was_accepted_for_that_round(self) -> None:
        seen: set[tuple[str, int]] = set()
        for m in self.mixed:
            assert (
                sum(m.coefficients.values()) == np.float64(1.0)
                or abs(sum(m.coefficients.values()) - 1) < 1e-9
            )
            for sender in m.mixed_with:
                assert (sender, m.round) in self.accepted
                assert (sender, m.round) not in seen
                seen.add((sender, m.round))

    @invariant()
    def deadlines_exist_while_waiting(self) -> None:
        waiting = self.peer.state in (PeerState.WAITING_FOR_NEIGHBOURS, PeerState.COLLECTING)
        assert (self.peer.next_deadline() is not None) == waiting


class PushSumMachine(_Base):
    def __init__(self) -> None:
        super().__init__()
        config = GossipConfig(rounds=6, mixing="push_sum", round_timeout_s=2.0)
        self.peer = PushSumPeer(config, node=NodeId("me"), run=RUN, weights=weights(0.0),
                                out_neighbours=NEIGHBOURS, rng=random.Random(1))  # fmt: skip
        self.mass_in = 1.0
        self.mass_out = 0.0
        self.added: set[tuple[str, int]] = set()

    @initialize()
    def start(self) -> None:
        self.feed(Started())

    def feed(self, event: Event) -> list[Command]:
        out = super().feed(event)
        for command in out:
            if isinstance(command, SendModel):
                self.mass_out += command.mass * len(command.to)
        return out

    @rule(node=senders, step=st.integers(-1, 8), mass=st.sampled_from([0.5, 0.25, 0.0, -1.0]))
    def share(self, node: NodeId, step: int, mass: float) -> None:
        out = self.feed(
            PeerModelReceived(sender=node, run=RUN, round=step, weights=weights(mass), mass=mass)
        )
        if not any(isinstance(c, Reject) for c in out):
            assert (node, step) not in self.added
            self.added.add((node, step))
            self.mass_in += mass

    @invariant()
    def mass_is_conserved(self) -> None:
        assert isinstance(self.peer, PushSumPeer)
        assert abs(self.peer.mass + self.mass_out - self.mass_in) < 1e-9
        assert self.peer.mass > 0

    @invariant()
    def deadline_only_between_steps(self) -> None:
        assert (self.peer.next_deadline() is not None) == (self.peer.state is PushSumState.PUSHED)


_SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
GossipPeerMachine.TestCase.settings = _SETTINGS
PushSumMachine.TestCase.settings = _SETTINGS
TestGossipPeer = GossipPeerMachine.TestCase
TestPushSumPeer = PushSumMachine.TestCase

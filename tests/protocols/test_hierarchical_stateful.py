"""Hypothesis stateful tests of the edge aggregator.

Random parent models (past, current, future rounds), children joining,
leaving, answering (right or wrong rounds, duplicates), failures, deadlines
and parent loss. Remote input must only ever produce command lists; local
rounds never go backwards; each parent round is answered at most once; an
upward update counts each child once, with the examples it was aggregated with.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fedbus._types import NodeId, RunId
from fedbus.errors import ProtocolError
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg import (
    BroadcastModel,
    FedAvgConfig,
    ManifestReceived,
    ModelReceived,
    NodeJoined,
    NodeLeft,
    Reject,
    RoundClosed,
    SendFailure,
    SendUpdate,
    Started,
    Stop,
    Tick,
    UpdateFailed,
    UpdateReceived,
)
from fedbus.protocols.hierarchical import EdgeAggregator, EdgeState
from fedbus.protocols.hierarchical_rehoming import (
    ParentLost,
    RehomeConfig,
    Rehoming,
    SwitchParent,
)

RUN = RunId("run-e")
CHILDREN = [NodeId(f"d{i}") for i in range(4)]
EXAMPLES = {c: 3 + 2 * i for i, c in enumerate(CHILDREN)}
children = st.sampled_from(CHILDREN)
E = 2


def weights(value: float, size: int = 3) -> dict[str, Any]:
    return {"w": np.full(size, value)}


class EdgeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        config = FedAvgConfig(min_clients=2, round_timeout_s=3.0, join_timeout_s=2.0,
                              max_round_retries=1)  # fmt: skip
        policy = Rehoming(RehomeConfig(fallbacks=(NodeId("p2"),)), parent=NodeId("p1"))
        self.edge = EdgeAggregator(
            config, node=NodeId("e"), run=RUN, edge_rounds=E, rehoming=policy
        )
        self.now = 0.0
        self.parent_round = 0
        self.broadcast_rounds: list[int] = []
        self.closed: list[RoundClosed] = []
        self.answered: list[tuple[int, int]] = []  # (parent generation, round)
        self.generation = 0
        self.updates: list[SendUpdate] = []
        self.done = False

    def feed(self, event: Event) -> list[Command]:
        try:
            out = self.edge.handle(event, now=self.now)
        except ProtocolError:  # pragma: no cover - the test fails below
            raise AssertionError(f"remote event raised: {event!r}") from None
        assert isinstance(out, list)
        assert all(isinstance(c, Command) for c in out)
        for command in out:
            assert not self.done or isinstance(command, Reject), command
            match command:
                case BroadcastModel():
                    self.broadcast_rounds.append(command.round)
                case RoundClosed():
                    self.closed.append(command)
                case SendUpdate() | SendFailure():
                    key = (self.generation, command.round)
                    if isinstance(command, SendUpdate) or "previous parent" not in command.reason:
                        assert key not in self.answered, f"parent round {key} answered twice"
                        self.answered.append(key)
                    if isinstance(command, SendUpdate):
                        self.check_update(command)
                case SwitchParent():
                    self.generation += 1
                case Stop():
                    self.done = True
        return out

    def check_update(self, update: SendUpdate) -> None:
        # the task's local rounds are the E just used up
        top = self.edge.local_base
        task = [c for c in self.closed if top - E < c.round <= top]
        assert task, "an update with no local round closed"
        assert update.metrics["edge_rounds"] == len(task)
        counted = {p for c in task for p in c.participants}
        assert update.num_examples == sum(EXAMPLES[NodeId(p)] for p in counted)
        self.updates.append(update)

    @initialize(joined=st.sampled_from([0, 1, 2, 3, 4, 4, 4]))
    def start(self, joined: int) -> None:
        self.feed(Started())
        for child in CHILDREN[:joined]:
            self.feed(NodeJoined(node=child, num_examples=EXAMPLES[child]))
        self.parent_model(1, True)  # a first task, so that runs get somewhere

    @rule(
        offset=st.sampled_from([-1, 0, 0, 0, 1, 1, 2]),
        selected=st.sampled_from([True, True, False]),
    )
    def parent_model(self, offset: int, selected: bool) -> None:
        self.parent_round = max(1, self.parent_round + offset)
        self.feed(ModelReceived(run=RUN, round=self.parent_round, weights=weights(0.0),
                                selected=selected, config={"lr": 0.1}))  # fmt: skip

    @rule(roll=st.integers(0, 40))
    def manifest(self, roll: int) -> None:  # the run's end, rarely, so that runs get far
        state = "finished" if roll == 0 else "collecting"
        self.feed(ManifestReceived(run=RUN, round=self.parent_round, state=state))

    @rule(child=children)
    def join(self, child: NodeId) -> None:
        self.feed(NodeJoined(node=child, num_examples=EXAMPLES[child]))

    @rule(child=children)
    def leave(self, child: NodeId) -> None:
        self.feed(NodeLeft(node=child))

    @rule(dt=st.floats(0.0, 2.5))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.feed(Tick())

    @rule(roll=st.integers(0, 9))
    def parent_lost(self, roll: int) -> None:
        if roll == 0:
            self.feed(ParentLost(parent=NodeId("p1")))

    @rule(child=children, offset=st.integers(-1, 1), bad=st.booleans())
    def update(self, child: NodeId, offset: int, bad: bool) -> None:
        inner = self.edge.inner
        round_ = max(0, (inner.current_round if inner else self.edge.local_base) + offset)
        self.feed(UpdateReceived(sender=child, run=RUN, round=round_, weights=weights(1.0, 4 if bad else 3),
                                 num_examples=EXAMPLES[child]))  # fmt: skip

    @precondition(lambda self: self.edge.inner is not None and bool(self.edge.inner.selected))
    @rule(fails=st.sets(children, max_size=2), upto=st.integers(1, 4))
    def selected_children_answer(self, fails: set[NodeId], upto: int) -> None:
        inner = self.edge.inner
        assert inner is not None
        round_ = inner.current_round
        for child in sorted(inner.selected)[:upto]:
            if child in fails:
                self.feed(UpdateFailed(sender=child, run=RUN, round=round_))
            else:
                self.feed(UpdateReceived(sender=child, run=RUN, round=round_,
                                         weights=weights(1.0), num_examples=EXAMPLES[child]))  # fmt: skip

    def teardown(self) -> None:
        # Shown by --hypothesis-show-statistics: how far the runs got.
        event(
            f"updates sent: {min(len(self.updates), 3)}, rounds closed: {min(len(self.closed), 5)}"
        )

    @invariant()
    def local_rounds_never_go_backwards(self) -> None:
        assert self.broadcast_rounds == sorted(self.broadcast_rounds)
        rounds = [c.round for c in self.closed]
        assert rounds == sorted(set(rounds))
        for c in self.closed:
            assert len(set(c.participants)) == len(c.participants)

    @invariant()
    def one_task_at_most(self) -> None:
        aggregating = self.edge.state is EdgeState.AGGREGATING
        assert (self.edge.inner is not None) == aggregating


EdgeMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
TestEdgeMachine = EdgeMachine.TestCase

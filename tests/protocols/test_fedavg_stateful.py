"""Hypothesis stateful tests: random join/leave/update/failure/deadline sequences.

The server must answer every remote event with a command list (no exception:
remote input is data), rounds never go backwards, nothing is aggregated twice,
and every round's participants were selected in the attempt that closed and
sent an update for that round.
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
    FedAvgServer,
    Finish,
    NodeJoined,
    NodeLeft,
    Reject,
    RoundClosed,
    SenderMismatched,
    ServerState,
    Started,
    Tick,
    UpdateFailed,
    UpdateReceived,
)

RUN = RunId("run-1")
NODES = [NodeId(f"n{i}") for i in range(6)]
nodes = st.sampled_from(NODES)


def weights(value: float, shape: tuple[int, ...] = (3,)) -> dict[str, Any]:
    return {"w": np.full(shape, value, np.float32)}


class ServerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.config = FedAvgConfig(rounds=4, min_clients=2, clients_per_round=3,
                                   round_timeout_s=10.0, join_timeout_s=5.0, max_round_retries=4)  # fmt: skip
        self.server = FedAvgServer(self.config, run=RUN, weights=weights(0.0), expected_nodes=3)
        self.now = 0.0
        self.counter = 0
        self.closed: list[RoundClosed] = []
        self.broadcasts: dict[tuple[int, int], frozenset[str]] = {}
        self.sent_updates: set[tuple[str, int]] = set()
        self.finished = False

    def feed(self, event: Event) -> list[Command]:
        try:
            out = self.server.handle(event, now=self.now)
        except ProtocolError:  # pragma: no cover - the test fails below
            raise AssertionError(f"remote event raised: {event!r}") from None
        assert isinstance(out, list)
        assert all(isinstance(c, Command) for c in out)
        for command in out:
            # after Finish, late input is only ever rejected
            assert not self.finished or isinstance(command, Reject), f"{command!r} after Finish"
            if isinstance(command, BroadcastModel):
                self.broadcasts[(command.round, command.attempt)] = frozenset(command.selected)
            elif isinstance(command, RoundClosed):
                self.closed.append(command)
            elif isinstance(command, Finish):
                self.finished = True
        return out

    @initialize(joined=st.integers(0, 4))
    def start(self, joined: int) -> None:
        self.feed(Started())
        for node in NODES[:joined]:
            self.feed(NodeJoined(node=node, num_examples=5))

    @rule(node=nodes)
    def join(self, node: NodeId) -> None:
        self.feed(NodeJoined(node=node, num_examples=5))

    @rule(node=nodes)
    def leave(self, node: NodeId) -> None:
        self.feed(NodeLeft(node=node))

    @rule(dt=st.floats(0.0, 4.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.feed(Tick())

    @rule(node=nodes, offset=st.integers(-2, 1), kind=st.sampled_from(["ok", "ok", "bad", "foreign"]),
          repeat_id=st.booleans())  # fmt: skip
    def update(self, node: NodeId, offset: int, kind: str, repeat_id: bool) -> None:
        round_ = max(0, self.server.current_round + offset)
        if not repeat_id:
            self.counter += 1
        shape = (4,) if kind == "bad" else (3,)
        event = UpdateReceived(
            sender=node, run=RunId("other") if kind == "foreign" else RUN, round=round_,
            weights=weights(float(self.counter), shape), num_examples=1 + self.counter % 7,
            update_id=f"u{self.counter}",
        )  # fmt: skip
        out = self.feed(event)
        if not any(isinstance(c, Reject) and c.sender == node for c in out):
            self.sent_updates.add((node, round_))

    @precondition(lambda self: bool(self.server.selected))
    @rule(data=st.data(), fail=st.sampled_from([False, False, False, True]))
    def selected_node_answers(self, data: st.DataObject, fail: bool) -> None:
        node = data.draw(st.sampled_from(sorted(self.server.selected)))
        round_ = self.server.current_round
        if fail:
            self.feed(UpdateFailed(sender=node, run=RUN, round=round_))
            return
        self.counter += 1
        out = self.feed(
            UpdateReceived(sender=node, run=RUN, round=round_, weights=weights(float(self.counter)),
                           num_examples=1 + self.counter % 7, update_id=f"u{self.counter}")
        )  # fmt: skip
        if not any(isinstance(c, Reject) and c.sender == node for c in out):
            self.sent_updates.add((node, round_))

    @rule(node=nodes, offset=st.integers(-1, 1))
    def failure(self, node: NodeId, offset: int) -> None:
        self.feed(
            UpdateFailed(sender=node, run=RUN, round=max(0, self.server.current_round + offset))
        )

    @rule(node=nodes)
    def forged(self, node: NodeId) -> None:
        out = self.feed(SenderMismatched(node=node, claimed="x", run=RUN, round=1))
        assert any(isinstance(c, Reject) and c.reason == "sender_mismatch" for c in out)

    def teardown(self) -> None:
        # Shown by --hypothesis-show-statistics: how far the runs got.
        event(f"rounds closed: {len(self.closed)}, finished: {self.finished}")

    @invariant()
    def rounds_never_go_backwards(self) -> None:
        assert [c.round for c in self.closed] == list(range(1, len(self.closed) + 1))
        assert self.server.completed_round == len(self.closed)
        assert self.server.current_round >= self.server.completed_round

    @invariant()
    def nothing_aggregated_twice_and_only_from_the_selected(self) -> None:
        for closed in self.closed:
            assert len(set(closed.participants)) == len(closed.participants)
            assert len(closed.participants) >= self.config.min_clients
            selected = self.broadcasts[(closed.round, closed.attempt)]
            for sender in closed.participants:
                assert sender in selected
                assert (sender, closed.round) in self.sent_updates
            assert set(closed.dropped) == selected - set(closed.participants)

    @invariant()
    def deadlines_exist_unless_idle_or_finished(self) -> None:
        idle_or_done = self.server.state in (ServerState.IDLE, ServerState.FINISHED)
        assert (self.server.next_deadline() is None) == idle_or_done


ServerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
TestServerMachine = ServerMachine.TestCase

"""FedBuff server machine: transcripts and a hypothesis state machine."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fedbus._types import NodeId, RunId
from fedbus.errors import ConfigError, LocalProtocolError
from fedbus.protocols.base import Command
from fedbus.protocols.fedavg import (
    BroadcastModel,
    Finish,
    NodeJoined,
    NodeLeft,
    Reject,
    Started,
    Tick,
    UpdateReceived,
)
from fedbus.protocols.fedbuff import (
    BufferAggregated,
    FedBuffConfig,
    FedBuffServer,
    FedBuffState,
    staleness_weight,
)

RUN = RunId("run-fb")


def _w(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, np.float32)}


def _update(
    sender: str, version: int, *values: float, uid: str = "", delta: bool = True
) -> UpdateReceived:
    return UpdateReceived(
        sender=NodeId(sender), run=RUN, round=version, weights=_w(*values), num_examples=1,
        encoding="delta" if delta else "dense", update_id=uid or f"{sender}-{version}",
    )  # fmt: skip


def _server(**kw: object) -> FedBuffServer:
    cfg = FedBuffConfig(**{"buffer_size": 2, "max_versions": 5, "max_staleness": 2, **kw})  # type: ignore[arg-type]
    server = FedBuffServer(cfg, run=RUN, weights=_w(0.0, 0.0))
    for node in ("a", "b", "c"):
        server.handle(NodeJoined(node=NodeId(node), num_examples=1), now=0.0)
    return server


def _of(cmds: list[Command], kind: type) -> list:
    return [c for c in cmds if isinstance(c, kind)]


def test_started_broadcasts_version_zero_to_everyone() -> None:
    server = _server()
    out = server.handle(Started(), now=0.0)
    (b,) = _of(out, BroadcastModel)
    assert (b.round, b.selected) == (0, ("a", "b", "c"))
    late = server.handle(NodeJoined(node=NodeId("d"), num_examples=1), now=1.0)
    assert [c.selected for c in _of(late, BroadcastModel)] == [("d",)]


def test_a_full_buffer_of_k_closes_an_aggregation() -> None:
    server = _server()
    server.handle(Started(), now=0.0)
    assert server.handle(_update("a", 0, 1.0, 2.0), now=1.0) == []
    assert server.buffered == 1
    out = server.handle(_update("b", 0, 3.0, 0.0, delta=False), now=2.0)
    (agg,) = _of(out, BufferAggregated)
    # both fresh (s = 1): x + (1/2) * ([1, 2] + [3, 0])
    assert agg.version == 1
    assert agg.weights["w"].tolist() == [2.0, 1.0]
    assert agg.contributors == (("a", 0, 0), ("b", 0, 0))
    (b,) = _of(out, BroadcastModel)
    assert b.round == 1
    assert server.buffered == 0


def test_stale_updates_are_discounted_by_one_over_sqrt_one_plus_staleness() -> None:
    server = _server(server_lr=1.0)
    server.handle(Started(), now=0.0)
    server.handle(_update("a", 0, 1.0, 1.0), now=1.0)
    server.handle(_update("b", 0, 1.0, 1.0), now=1.0)  # -> version 1 = [1, 1]
    server.handle(_update("c", 0, 4.0, 0.0), now=2.0)  # staleness 1: weight 1/sqrt(2)
    out = server.handle(_update("a", 1, 0.0, 2.0), now=3.0)  # fresh
    (agg,) = _of(out, BufferAggregated)
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(agg.weights["w"], [1 + 4 * s / 2, 1 + 2 / 2], rtol=1e-6)
    assert agg.contributors == (("a", 1, 0), ("c", 0, 1))
    assert staleness_weight(3, 0.5) == 0.5


def test_dense_stale_update_is_a_delta_against_the_model_it_was_trained_on() -> None:
    server = _server(buffer_size=1)
    server.handle(Started(), now=0.0)
    server.handle(_update("a", 0, 1.0, 1.0), now=1.0)  # v1 = [1, 1]
    out = server.handle(_update("b", 0, 2.0, 0.0, delta=False), now=2.0)  # delta [2, 0] vs v0
    (agg,) = _of(out, BufferAggregated)
    np.testing.assert_allclose(agg.weights["w"], [1 + 2 / math.sqrt(2), 1.0], rtol=1e-6)


def test_rejections_stale_future_duplicate_unknown_and_foreign() -> None:
    server = _server(buffer_size=1, max_staleness=1)
    server.handle(Started(), now=0.0)
    server.handle(_update("a", 0, 1.0, 1.0), now=1.0)  # v1
    server.handle(_update("a", 1, 1.0, 1.0), now=1.0)  # v2: v0 is now 2 behind
    reasons = {}
    for name, ev in {
        "stale": _update("b", 0, 1.0, 1.0),
        "future": _update("b", 7, 1.0, 1.0),
        "dup": _update("a", 1, 1.0, 1.0, uid="fresh-id"),
        "unknown": _update("z", 2, 1.0, 1.0),
        "foreign": UpdateReceived(sender=NodeId("b"), run=RunId("other"), round=2,
                                  weights=_w(1, 1), num_examples=1),
        "invalid": _update("b", 2, float("nan"), 1.0),
    }.items():  # fmt: skip
        (r,) = _of(server.handle(ev, now=2.0), Reject)
        reasons[name] = r.reason
    assert reasons == {
        "stale": "stale_round", "future": "future_round", "dup": "duplicate",
        "unknown": "unselected", "foreign": "foreign_run", "invalid": "invalid",
    }  # fmt: skip
    assert server.version == 2


def test_duplicate_memory_is_bounded_by_the_staleness_window() -> None:
    server = _server(buffer_size=1, max_staleness=1, max_versions=50)
    server.handle(Started(), now=0.0)
    for v in range(40):  # one update per version: 40 aggregations
        (agg,) = _of(
            server.handle(_update("abc"[v % 3], v, 1.0, 0.0), now=1.0 + v), BufferAggregated
        )
        assert agg.version == v + 1
    # only the versions that can still be accepted are remembered
    assert sorted(server._seen) == [39]
    # a repeated id on an acceptable version, and a second update of one sender
    # on one version, are still duplicates; an old id on an old version is stale
    (dup_id,) = _of(server.handle(_update("b", 40, 1.0, 0.0, uid="a-39"), now=50.0), Reject)
    (dup_pair,) = _of(server.handle(_update("a", 39, 1.0, 0.0, uid="new"), now=50.0), Reject)
    (stale,) = _of(server.handle(_update("b", 10, 1.0, 0.0), now=50.0), Reject)
    assert (dup_id.reason, dup_pair.reason, stale.reason) == (
        "duplicate",
        "duplicate",
        "stale_round",
    )


def test_finishes_after_max_versions_and_refuses_late_updates() -> None:
    server = _server(buffer_size=1, max_versions=2)
    server.handle(Started(), now=0.0)
    server.handle(_update("a", 0, 1.0, 0.0), now=1.0)
    out = server.handle(_update("b", 1, 1.0, 0.0), now=2.0)
    assert _of(out, Finish)
    assert not _of(out, BroadcastModel)
    assert server.state is FedBuffState.FINISHED
    assert _of(server.handle(_update("c", 2, 1.0, 0.0), now=3.0), Reject)


def test_config_validation_and_misuse() -> None:
    with pytest.raises(ConfigError, match="buffer_size"):
        FedBuffConfig(buffer_size=0)
    with pytest.raises(ConfigError, match="max_staleness"):
        FedBuffConfig(max_staleness=-1)
    with pytest.raises(ConfigError, match="server_lr"):
        FedBuffConfig(server_lr=0.0)
    server = _server()
    server.handle(Started(), now=5.0)
    with pytest.raises(LocalProtocolError):
        server.handle(Started(), now=6.0)
    assert server.state is FedBuffState.ERROR


class FedBuffMachine(RuleBasedStateMachine):
    """Random joins, leaves, updates of any version and waits.

    Versions never go back, nothing is aggregated twice, a partial buffer is
    flushed only at a deadline, and a running server always has a deadline.
    """

    K, MIN, WAIT, JOIN = 3, 2, 15.0, 10.0

    def __init__(self) -> None:
        super().__init__()
        cfg = FedBuffConfig(
            buffer_size=self.K, max_versions=1000, max_staleness=2, min_clients=self.MIN,
            round_timeout_s=self.WAIT, join_timeout_s=self.JOIN,
        )  # fmt: skip
        self.server = FedBuffServer(cfg, run=RUN, weights=_w(0.0))
        self.now = 0.0
        self.versions: list[int] = [0]
        self.aggregated: set[str] = set()
        self.sent = 0
        self.first = ("a", 0)
        self.last_broadcast = 0
        self.progress = 0.0  # when the last update was accepted (or the run started)
        self.first_wait = True
        self.finished: Finish | None = None
        self.deadline_flushes = 0
        for node in "abcde":
            self.server.handle(NodeJoined(node=NodeId(node), num_examples=1), now=0.0)
        self.server.handle(Started(), now=0.0)

    def _feed(self, event: object, dt: float = 1.0) -> list[Command]:
        self.now += dt
        deadline = self.server.next_deadline()
        expired = deadline is not None and self.now >= deadline
        out = self.server.handle(event, now=self.now)  # type: ignore[arg-type]
        for cmd in out:
            if isinstance(cmd, BroadcastModel):
                # a new version goes to everyone once; re-sends (to a newcomer) repeat the newest
                assert cmd.round >= self.last_broadcast
                assert cmd.round == self.server.version
                self.last_broadcast = cmd.round
            if isinstance(cmd, BufferAggregated):
                assert cmd.version == self.versions[-1] + 1
                self.versions.append(cmd.version)
                # a full buffer, or (only when a deadline passed) at least min_clients
                assert len(cmd.contributors) == self.K or (
                    cmd.deadline and expired and self.MIN <= len(cmd.contributors) < self.K
                )
                assert all(s <= 2 for _, _, s in cmd.contributors)
                self.progress = self.now
                self.deadline_flushes += cmd.deadline
            if isinstance(cmd, Finish):
                assert expired, "the run ends only at its deadline (max_versions is unreachable)"
                assert not cmd.success
                self.finished = cmd
        return out

    @rule(node=st.sampled_from("abcde"))
    def join(self, node: str) -> None:
        self._feed(NodeJoined(node=NodeId(node), num_examples=1))

    @rule(node=st.sampled_from("abcde"))
    def leave(self, node: str) -> None:
        self._feed(NodeLeft(node=NodeId(node)))

    @rule(dt=st.floats(0.0, 20.0))
    def wait(self, dt: float) -> None:
        self._feed(Tick(), dt)

    @rule(node=st.sampled_from("abcde"))
    def fresh_update(self, node: str) -> None:
        self.update(node, 0, False)

    @rule(node=st.sampled_from("abcde"), back=st.integers(-1, 4), reuse=st.booleans())
    def update(self, node: str, back: int, reuse: bool) -> None:
        version = self.server.version - back
        if version < 0:
            return
        uid = f"u{self.sent}"
        if reuse and self.sent:  # a redelivery of the first message: same id, sender, version
            uid, (node, version) = "u0", self.first
        elif not self.sent:
            self.first = (node, version)
        self.sent += 1
        buffered = self.server.buffered
        deadline = self.server.next_deadline()
        out = self._feed(_update(node, version, 1.0, uid=uid))
        if not _of(out, Reject) and self.server.state is FedBuffState.RUNNING:
            assert uid not in self.aggregated
            self.aggregated.add(uid)
            self.progress = self.now
            self.first_wait = False
            if deadline is not None and self.now < deadline:  # no deadline flush first
                assert self.server.buffered == (buffered + 1) % self.K

    @invariant()
    def buffer_below_k_and_deadline_bounded(self) -> None:
        assert self.server.buffered < self.K
        assert self.server.version == self.versions[-1]
        deadline = self.server.next_deadline()
        if self.server.state is FedBuffState.RUNNING:
            # every wait has a deadline: the next accepted update, or the end
            assert deadline is not None
            assert deadline > self.now
            expected = self.progress + self.WAIT + (self.JOIN if self.first_wait else 0)
            assert math.isclose(deadline, expected)
        else:
            assert self.server.state is FedBuffState.FINISHED
            assert self.finished is not None
            assert deadline is None


FedBuffMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)
test_fedbuff_stateful = FedBuffMachine.TestCase


def test_async_client_finishes_stale_work_then_trains_on_the_newest_model() -> None:
    from fedbus.protocols.fedavg import (
        ASYNC_KEY,
        CancelTraining,
        FedAvgClient,
        ModelReceived,
        SendUpdate,
        Train,
        TrainingDone,
    )

    client = FedAvgClient(run=RUN)
    cfg = {"epochs": 1, ASYNC_KEY: True}

    def model(r: int) -> ModelReceived:
        return ModelReceived(run=RUN, round=r, weights=_w(0.0), selected=True, config=cfg)

    assert _of(client.handle(model(1), now=0.0), Train)[0].round == 1
    # Versions 2 and 3 arrive while training on 1: nothing is cancelled.
    assert client.handle(model(2), now=1.0) == []
    assert client.handle(model(3), now=2.0) == []
    done = TrainingDone(round=1, weights=_w(1.0), num_examples=1)
    out = client.handle(done, now=3.0)
    assert not _of(out, CancelTraining)
    assert [c.round for c in _of(out, SendUpdate)] == [1]  # the stale update, tagged 1
    (train,) = _of(out, Train)
    assert train.round == 3  # the newest version
    assert ASYNC_KEY not in train.config

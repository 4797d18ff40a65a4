"""FedBuff with ``protocol.validators``: a buffer is judged when it is flushed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fedbus._types import NodeId, RunId
from fedbus.aggregation import Arrays, ClientUpdate, NormOutlier
from fedbus.protocols.base import Command
from fedbus.protocols.fedavg import (
    Finish,
    NodeJoined,
    NodeLeft,
    Reject,
    Started,
    Tick,
    UpdateReceived,
)
from fedbus.protocols.fedbuff import BufferAggregated, FedBuffConfig, FedBuffServer

RUN = RunId("run-val")
HONEST = {"a": (1.0, 0.9), "b": (1.1, 1.0), "c": (0.9, 1.1), "d": (1.0, 1.0)}


def _w(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, np.float32)}


def _update(sender: str, version: int, *values: float) -> UpdateReceived:
    return UpdateReceived(
        sender=NodeId(sender), run=RUN, round=version, weights=_w(*values), num_examples=1,
        encoding="delta", update_id=f"{sender}-{version}",
    )  # fmt: skip


class _Refuse:
    """Rejects the keys it is told to, and records what it was shown."""

    name = "refuse"

    def __init__(self, keys: set[str]) -> None:
        self.keys = keys
        self.seen: list[tuple[list[str], int]] = []

    def validate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, str]:
        self.seen.append(([u.sender for u in updates], round))
        return {u.sender: "refused" for u in updates if u.sender in self.keys}


def _server(validators: Sequence[object], **kw: object) -> FedBuffServer:
    cfg = FedBuffConfig(**{"buffer_size": 5, "max_versions": 10, "round_timeout_s": 10.0, **kw})  # type: ignore[arg-type]
    server = FedBuffServer(cfg, run=RUN, weights=_w(0.0, 0.0), validators=validators)  # type: ignore[arg-type]
    for node in ("a", "b", "c", "d", "e"):
        server.handle(NodeJoined(node=NodeId(node), num_examples=1), now=0.0)
    server.handle(Started(), now=0.0)
    return server


def _of(cmds: list[Command], kind: type) -> list:
    return [c for c in cmds if isinstance(c, kind)]


def test_a_sign_flipping_update_is_rejected_by_norm_outlier_and_counted() -> None:
    # Prepare: four honest deltas near [1, 1]; e sends -4x an honest one.
    server = _server([NormOutlier()])
    for node, delta in HONEST.items():
        assert server.handle(_update(node, 0, *delta), now=1.0) == []
    # Execute: the fifth update fills the buffer.
    out = server.handle(_update("e", 0, -4.0, -4.0), now=2.0)
    # Assert: e is refused with the validator's reason, the other four averaged.
    (reject,) = _of(out, Reject)
    assert (reject.sender, reject.round, reject.reason, reject.update_id) == (
        "e", 0, "norm_outlier", "e-0",
    )  # fmt: skip
    (agg,) = _of(out, BufferAggregated)
    assert [c[0] for c in agg.contributors] == ["a", "b", "c", "d"]
    assert agg.rejected == {"norm_outlier": 1}
    np.testing.assert_allclose(agg.weights["w"], [1.0, 1.0], rtol=1e-6)
    assert server.rejected == {"norm_outlier": 1}


def test_validators_see_one_key_per_update_and_the_next_version_as_round() -> None:
    # One sender with two updates of different versions in the same buffer.
    refuse = _Refuse(set())
    server = _server([refuse], buffer_size=2, max_staleness=3)
    server.handle(_update("a", 0, 1.0, 1.0), now=1.0)
    server.handle(_update("b", 0, 1.0, 1.0), now=1.0)  # -> version 1
    server.handle(_update("a", 1, 1.0, 1.0), now=2.0)
    out = server.handle(_update("c", 0, 1.0, 1.0), now=2.0)  # -> version 2
    assert _of(out, BufferAggregated)
    assert refuse.seen == [(["a@0", "b@0"], 1), (["a@1", "c@0"], 2)]


def test_survivors_below_min_clients_stay_buffered_and_rejections_are_reported_later() -> None:
    # Prepare: K = 3, min_clients = 2; a and b are refused.
    server = _server([_Refuse({"a@0", "b@0"})], buffer_size=3, min_clients=2)
    server.handle(_update("a", 0, 1.0, 1.0), now=1.0)
    server.handle(_update("b", 0, 1.0, 1.0), now=1.0)
    # Execute: the buffer is full, but only c survives.
    out = server.handle(_update("c", 0, 2.0, 2.0), now=1.0)
    # Assert
    assert [r.reason for r in _of(out, Reject)] == ["refused", "refused"]
    assert not _of(out, BufferAggregated)
    assert server.buffered == 1
    server.handle(_update("d", 0, 4.0, 4.0), now=2.0)
    (agg,) = _of(server.handle(_update("e", 0, 0.0, 0.0), now=3.0), BufferAggregated)
    assert [c[0] for c in agg.contributors] == ["c", "d", "e"]
    assert agg.rejected == {"refused": 2}
    np.testing.assert_allclose(agg.weights["w"], [2.0, 2.0])


def test_a_deadline_flush_whose_survivors_are_too_few_ends_the_run() -> None:
    server = _server([_Refuse({"a@0"})], buffer_size=3, min_clients=2)
    server.handle(_update("a", 0, 1.0, 1.0), now=1.0)
    server.handle(_update("b", 0, 1.0, 1.0), now=2.0)
    out = server.handle(Tick(), now=12.0)
    assert [r.sender for r in _of(out, Reject)] == ["a"]
    (finish,) = _of(out, Finish)
    assert not finish.success
    assert "1 buffered update(s)" in finish.reason


class _Negative:
    """Refuses every update whose delta sums below zero (a stand-in for an outlier check)."""

    name = "negative"

    def validate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, str]:
        return {u.sender: self.name for u in updates if float(np.sum(u.weights["w"])) < 0}


class ValidatedFedBuffMachine(RuleBasedStateMachine):
    """Random updates, some refused by a validator, joins, leaves and waits.

    Every accepted update ends exactly one way (aggregated, refused by the
    validator, or still buffered), a refused one is never aggregated, an
    aggregation has at least min_clients updates, and every refusal is
    reported in the next aggregation's ``rejected``.
    """

    K, MIN = 3, 2

    def __init__(self) -> None:
        super().__init__()
        cfg = FedBuffConfig(
            buffer_size=self.K, max_versions=1000, max_staleness=2, min_clients=self.MIN,
            round_timeout_s=15.0, join_timeout_s=10.0,
        )  # fmt: skip
        self.server = FedBuffServer(cfg, run=RUN, weights=_w(0.0), validators=[_Negative()])
        self.now = 0.0
        self.sent = 0
        self.accepted: dict[tuple[str, int], str] = {}  # (sender, version) -> update id
        self.aggregated: set[str] = set()
        self.refused: set[str] = set()
        self.negative: set[str] = set()
        self.unreported = 0  # validator refusals not yet in a BufferAggregated
        self.arriving: dict[tuple[str, int], str] = {}
        self.versions = 0
        for node in "abcd":
            self.server.handle(NodeJoined(node=NodeId(node), num_examples=1), now=0.0)
        self.server.handle(Started(), now=0.0)

    def _feed(self, event: object, dt: float = 1.0) -> list[Command]:
        self.now += dt
        out = self.server.handle(event, now=self.now)  # type: ignore[arg-type]
        for cmd in out:
            if isinstance(cmd, Reject) and cmd.detail == "validator":
                assert cmd.reason == "negative"
                assert cmd.update_id in self.negative
                assert cmd.update_id not in self.refused | self.aggregated
                self.refused.add(cmd.update_id)
                self.unreported += 1
            if isinstance(cmd, BufferAggregated):
                assert len(cmd.contributors) >= self.MIN
                assert cmd.rejected.get("negative", 0) == self.unreported
                self.unreported = 0
                self.versions += 1
                for sender, version, _ in cmd.contributors:
                    uid = self.accepted.get((sender, version)) or self.arriving[(sender, version)]
                    assert uid not in self.negative
                    assert uid not in self.aggregated | self.refused
                    self.aggregated.add(uid)
        return out

    @rule(node=st.sampled_from("abcd"))
    def join(self, node: str) -> None:
        self._feed(NodeJoined(node=NodeId(node), num_examples=1))

    @rule(node=st.sampled_from("abcd"))
    def leave(self, node: str) -> None:
        self._feed(NodeLeft(node=NodeId(node)))

    @rule(dt=st.floats(0.0, 20.0))
    def wait(self, dt: float) -> None:
        self._feed(Tick(), dt)

    @rule(node=st.sampled_from("abcd"), sign=st.sampled_from([1.0, -1.0]))
    def fresh_update(self, node: str, sign: float) -> None:
        self.update(node, 0, sign)

    @rule(node=st.sampled_from("abcd"), back=st.integers(0, 3), sign=st.sampled_from([1.0, -1.0]))
    def update(self, node: str, back: int, sign: float) -> None:
        version = self.server.version - back
        if version < 0:
            return
        uid = f"u{self.sent}"
        self.sent += 1
        if sign < 0:
            self.negative.add(uid)
        self.arriving = {(node, version): uid}  # it may be aggregated as it arrives
        out = self._feed(UpdateReceived(
            sender=NodeId(node), run=RUN, round=version, weights=_w(sign), num_examples=1,
            encoding="delta", update_id=uid,
        ))  # fmt: skip
        arrival = [r for r in _of(out, Reject) if r.update_id == uid and r.detail != "validator"]
        if not arrival:  # buffered (and maybe already aggregated or refused)
            assert (node, version) not in self.accepted
            self.accepted[(node, version)] = uid

    @invariant()
    def every_accepted_update_ends_one_way(self) -> None:
        assert self.server.buffered < self.K
        pending = set(self.accepted.values()) - self.aggregated - self.refused
        assert len(pending) == self.server.buffered
        assert self.server.rejected.get("negative", 0) == len(self.refused)


ValidatedFedBuffMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=50, deadline=None
)
test_validated_fedbuff_stateful = ValidatedFedBuffMachine.TestCase

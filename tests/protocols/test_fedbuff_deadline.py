"""FedBuff's aggregation deadline and resuming from a version: transcripts (time injected)."""

from __future__ import annotations

import numpy as np
import pytest

from fedbus._types import NodeId, RunId
from fedbus.errors import ConfigError
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
from fedbus.protocols.fedbuff import BufferAggregated, FedBuffConfig, FedBuffServer, FedBuffState

RUN = RunId("run-dl")
WAIT, JOIN = 10.0, 5.0


def _w(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, np.float32)}


def _update(sender: str, version: int, *values: float) -> UpdateReceived:
    return UpdateReceived(
        sender=NodeId(sender), run=RUN, round=version, weights=_w(*values), num_examples=1,
        encoding="delta", update_id=f"{sender}-{version}",
    )  # fmt: skip


def _server(
    version: int = 0, weights: tuple[float, ...] = (0.0, 0.0), **kw: object
) -> FedBuffServer:
    cfg = FedBuffConfig(
        **{  # type: ignore[arg-type]
            "buffer_size": 3, "max_versions": 5, "max_staleness": 2,
            "round_timeout_s": WAIT, "join_timeout_s": JOIN, **kw,
        }
    )  # fmt: skip
    server = FedBuffServer(cfg, run=RUN, weights=_w(*weights), version=version)
    for node in ("a", "b", "c"):
        server.handle(NodeJoined(node=NodeId(node), num_examples=1), now=0.0)
    return server


def _of(cmds: list[Command], kind: type) -> list:
    return [c for c in cmds if isinstance(c, kind)]


def test_with_no_update_the_run_ends_at_join_plus_round_timeout_with_a_reason() -> None:
    # Prepare
    server = _server()
    server.handle(Started(), now=100.0)
    # Execute / Assert: the first wait is join_timeout_s + round_timeout_s.
    assert server.next_deadline() == 100.0 + JOIN + WAIT
    assert server.handle(Tick(), now=114.0) == []  # early tick: nothing
    for node in ("a", "b", "c"):
        server.handle(NodeLeft(node=NodeId(node)), now=114.5)
    (finish,) = _of(server.handle(Tick(), now=115.0), Finish)
    assert not finish.success
    assert finish.completed_round == 0
    assert finish.reason == (
        "no update accepted for 15 s at version 0: 0 buffered update(s) "
        "(buffer_size=3, min_clients=1), 0 live node(s)"
    )
    assert server.state is FedBuffState.FINISHED
    assert server.next_deadline() is None


def test_accepted_updates_move_the_deadline_joins_and_rejections_do_not() -> None:
    server = _server()
    server.handle(Started(), now=0.0)
    server.handle(_update("a", 0, 1.0, 1.0), now=2.0)
    assert server.next_deadline() == 2.0 + WAIT  # the join allowance was for the first wait only
    server.handle(NodeJoined(node=NodeId("d"), num_examples=1), now=3.0)
    assert _of(server.handle(_update("a", 0, 1.0, 1.0), now=4.0), Reject)  # a duplicate
    server.handle(_update("z", 0, 1.0, 1.0), now=5.0)  # never joined: rejected
    assert server.next_deadline() == 2.0 + WAIT


def test_a_partial_buffer_is_flushed_at_the_deadline_as_the_mean_of_what_it_holds() -> None:
    # Prepare: K = 3, min_clients = 2; two updates arrive, then silence.
    server = _server(min_clients=2)
    server.handle(Started(), now=0.0)
    server.handle(_update("a", 0, 2.0, 0.0), now=1.0)
    server.handle(_update("b", 0, 0.0, 4.0), now=2.0)
    # Execute
    out = server.handle(Tick(), now=2.0 + WAIT)
    # Assert: (1/2) * ([2, 0] + [0, 4]), and the next version goes out.
    (agg,) = _of(out, BufferAggregated)
    assert agg.deadline is True
    assert agg.version == 1
    assert agg.weights["w"].tolist() == [1.0, 2.0]
    assert [c.round for c in _of(out, BroadcastModel)] == [1]
    assert server.state is FedBuffState.RUNNING
    assert server.next_deadline() == 2.0 + 2 * WAIT
    # Execute again: the clients are gone; the next deadline ends the run.
    (finish,) = _of(server.handle(Tick(), now=2.0 + 2 * WAIT), Finish)
    assert not finish.success
    assert finish.completed_round == 1
    assert "no update accepted for 10 s at version 1: 0 buffered" in finish.reason


def test_a_buffer_below_min_clients_at_the_deadline_ends_the_run() -> None:
    server = _server(min_clients=2)
    server.handle(Started(), now=0.0)
    server.handle(_update("a", 0, 2.0, 0.0), now=1.0)
    out = server.handle(Tick(), now=1.0 + WAIT)
    assert not _of(out, BufferAggregated)
    (finish,) = _of(out, Finish)
    assert "1 buffered update(s) (buffer_size=3, min_clients=2), 3 live node(s)" in finish.reason
    assert server.version == 0


def test_an_expired_deadline_is_handled_before_the_update_that_noticed_it() -> None:
    # The update trained on version 0 arrives after the deadline: the partial
    # buffer is flushed first, so it counts as one version stale.
    server = _server()
    server.handle(Started(), now=0.0)
    server.handle(_update("a", 0, 1.0, 1.0), now=1.0)
    out = server.handle(_update("b", 0, 1.0, 1.0), now=1.0 + WAIT + 0.5)
    (agg,) = _of(out, BufferAggregated)
    assert agg.contributors == (("a", 0, 0),)
    assert server.version == 1
    assert server.buffered == 1  # b's update, staleness 1, waits in the next buffer


def test_resume_from_a_version_continues_its_numbering_and_refuses_older_bases() -> None:
    # Prepare: a checkpoint at version 3.
    server = _server(version=3, weights=(1.0, 1.0), buffer_size=1)
    # Execute
    started = server.handle(Started(), now=0.0)
    # Assert
    (b,) = _of(started, BroadcastModel)
    assert (b.round, b.weights["w"].tolist()) == (3, [1.0, 1.0])
    (r,) = _of(server.handle(_update("a", 2, 1.0, 1.0), now=1.0), Reject)
    assert r.reason == "stale_round"  # version 2's model is not in the checkpoint
    (agg,) = _of(server.handle(_update("b", 3, 1.0, 0.0), now=2.0), BufferAggregated)
    assert (agg.version, agg.weights["w"].tolist()) == (4, [2.0, 1.0])


def test_resuming_after_the_last_version_finishes_at_once() -> None:
    server = _server(version=5)
    (finish,) = _of(server.handle(Started(), now=0.0), Finish)
    assert finish.success
    assert finish.completed_round == 5
    assert server.next_deadline() is None


@pytest.mark.parametrize(
    ("kw", "path"),
    [
        ({"min_clients": 4}, "protocol.min_clients"),
        ({"min_clients": 0}, "protocol.min_clients"),
        ({"round_timeout_s": 0.0}, "protocol.round_timeout_s"),
        ({"join_timeout_s": float("inf")}, "protocol.join_timeout_s"),
    ],
)
def test_deadline_settings_are_checked(kw: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        FedBuffConfig(buffer_size=3, **kw)  # type: ignore[arg-type]
    assert info.value.path == path

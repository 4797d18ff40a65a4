"""The collector settings a federation runs under (fedbus.launch.gcfreeze)."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from fedbus.launch.gcfreeze import MIDDLE_THRESHOLD, FreezeWhenRunning, QuietCollector
from fedbus.nodes import ServerObserver
from fedbus.protocols.fedavg import RoundFailed


@pytest.fixture(autouse=True)
def _restore_collector() -> Iterator[None]:
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)
    gc.unfreeze()


class Recorder(ServerObserver):
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_joined(self, joined: int, expected: int | None) -> None:
        self.calls.append(("joined", (joined, expected)))

    def on_round(self, row: Mapping[str, Any]) -> None:
        self.calls.append(("round", row["round"]))

    def on_round_failed(self, failed: RoundFailed) -> None:
        self.calls.append(("failed", failed.round))


def test_quiet_collector_freezes_spaces_out_and_restores() -> None:
    gc.set_threshold(700, 10, 10)
    garbage = [[] for _ in range(100)]
    collector = QuietCollector()
    assert gc.get_freeze_count() >= len(garbage)
    assert gc.get_threshold() == (700, MIDDLE_THRESHOLD, 10)
    collector.close()
    collector.close()  # idempotent
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == (700, 10, 10)


def test_quiet_collector_keeps_a_higher_middle_threshold() -> None:
    gc.set_threshold(500, 1000, 3)
    collector = QuietCollector()
    assert gc.get_threshold() == (500, 1000, 3)
    collector.close()
    assert gc.get_threshold() == (500, 1000, 3)


def test_freezes_once_every_declared_node_joined() -> None:
    inner = Recorder()
    observer = FreezeWhenRunning(inner)
    observer.on_joined(1, 2)
    assert not observer.frozen
    assert gc.get_freeze_count() == 0
    observer.on_joined(2, 2)
    assert observer.frozen
    frozen = gc.get_freeze_count()
    assert frozen > 0
    _ = [[] for _ in range(100)]  # made later: not frozen by a second call
    observer.on_round({"round": 1})
    observer.on_round_failed(
        RoundFailed(round=2, attempt=1, reason="quorum", answered=(), rejected={})
    )
    assert gc.get_freeze_count() == frozen
    assert inner.calls == [("joined", (1, 2)), ("joined", (2, 2)), ("round", 1), ("failed", 2)]


def test_freezes_at_the_first_round_when_nodes_never_all_join() -> None:
    # External nodes may never join; an unknown expected count never triggers.
    observer = FreezeWhenRunning(None)
    observer.on_joined(3, None)
    observer.on_joined(3, 5)
    assert not observer.frozen
    observer.on_round({"round": 1})
    assert observer.frozen
    assert gc.get_freeze_count() > 0

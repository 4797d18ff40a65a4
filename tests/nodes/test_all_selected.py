"""``selected: ["*"]``: the server sends it when every live node is selected (issue 3)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fedbus.launch import open_bus
from fedbus.launch.build import build_data, client_trainer
from fedbus.launch.federation import client_settings, make_server
from fedbus.messages import (
    ALL_SELECTED,
    Manifest,
    ModelBroadcast,
    compact_selection,
    confirms_join,
    is_selected,
)
from fedbus.nodes import ClientNode, ServerObserver
from fedbus.nodes.shared_views import is_selected as node_is_selected
from fedbus.transport.base import Transport, Will
from fedbus.transport.messenger import Messenger
from tests.nodes.conftest import topology

pytestmark = pytest.mark.timeout(60)


def test_compact_selection_only_for_every_live_node() -> None:
    live = frozenset({"a", "b", "c"})
    assert compact_selection(("a", "b", "c"), live) == [ALL_SELECTED]
    assert compact_selection(("a", "b"), live) == ["a", "b"]
    assert compact_selection(("a", "b", "x"), live) == ["a", "b", "x"]
    assert compact_selection((), frozenset()) == []


@pytest.mark.parametrize("many", [False, True])
def test_receivers_read_the_star(many: bool) -> None:
    names = [f"n{i}" for i in range(40 if many else 2)]
    assert is_selected("z", ["*"])
    assert not confirms_join("z", ["*"])
    assert confirms_join("n1", names)
    assert not is_selected("z", names)
    star = [*names, "*"]  # a star anywhere selects every node
    assert node_is_selected("z", star)
    assert not node_is_selected("z", star, explicit=True)
    assert node_is_selected("n1", star, explicit=True)
    assert not node_is_selected("z", names)


class _Rows(ServerObserver):
    def __init__(self) -> None:
        self.rows: list[Mapping[str, Any]] = []

    def on_round(self, row: Mapping[str, Any]) -> None:
        self.rows.append(row)


async def test_the_server_sends_a_star_when_all_live_nodes_are_selected(tmp_path: Path) -> None:
    # Prepare: 3 clients, all selected every round; a spy records the broadcasts.
    topo, _ = topology(clients=3, rounds=2)
    data = build_data(topo, tmp_path)
    seen: list[Any] = []
    watch = _Rows()
    async with open_bus(topo) as bus:

        def connect_as(node: str) -> Any:
            def connect(will: Will) -> Transport:
                return bus.connect(node, will)

            return connect

        server = make_server(
            topo, data, bus.connect("server", None), run_id="star-1", out=None, observer=watch
        )
        clients = [
            ClientNode(
                client_trainer(topo, data, f"client-{i}"),
                connect_as(f"client-{i}"),
                client_settings(topo, f"client-{i}"),
            )
            for i in range(3)
        ]
        async with (
            bus.connect("spy", None) as transport,
            Messenger(transport, node_id="spy", run=topo.name, strict_run=False) as spy,
        ):
            await spy.subscribe_broadcasts("server", "model")
            await spy.subscribe_broadcasts("server", "manifest")

            async def record() -> None:
                async for _topic, msg in spy.messages():
                    seen.append(msg)

            recorder = asyncio.create_task(record())
            # Execute
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(c.run()) for c in clients]
                outcome = await server.run()
            recorder.cancel()
    # Assert: every client answered every round, from broadcasts naming "*" only
    assert outcome.success, outcome.reason
    assert {t.result().status for t in tasks} == {"finished"}
    assert [r["participants"] for r in watch.rows] == [3, 3]
    models = [m for m in seen if isinstance(m, ModelBroadcast)]
    assert len(models) >= 2
    assert all(m.selected == [ALL_SELECTED] for m in models)
    collecting = [m for m in seen if isinstance(m, Manifest) and m.state == "collecting"]
    assert all(m.selected == [ALL_SELECTED] for m in collecting)

"""Resuming an interrupted run, and a client that joins a running federation."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.launch import open_bus, run_federation
from fedbus.launch.build import build_data, client_trainer
from fedbus.launch.federation import client_settings, make_server
from fedbus.learning.trainer import FitConfig, FitResult, Trainer
from fedbus.nodes import ClientNode, ServerObserver, read_checkpoint
from fedbus.transport.base import Transport, Will
from tests.nodes.conftest import topology

pytestmark = pytest.mark.timeout(60)


class _CancelAfter(ServerObserver):
    def __init__(self, task: asyncio.Task[Any], round_num: int) -> None:
        self.task, self.round_num = task, round_num

    def on_round(self, row: Mapping[str, Any]) -> None:
        if row["round"] == self.round_num:
            self.task.cancel()  # as Ctrl-C does to fedbus run


async def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    # Prepare: the uninterrupted run.
    topo, text = topology(clients=3, rounds=4, seed=3)
    full = await run_federation(topo, out=tmp_path / "full")
    assert full.server.success, full.server.reason
    # Execute: interrupt after round 2, then resume from the folder.
    out = tmp_path / "cut"
    holder: dict[str, asyncio.Task[Any]] = {}

    async def interrupted() -> None:
        await run_federation(
            topo, out=out, topology_text=text, observer=_CancelAfter(holder["t"], 2)
        )

    holder["t"] = asyncio.create_task(interrupted())
    with pytest.raises(asyncio.CancelledError):
        await holder["t"]
    checkpoint = read_checkpoint(out / "checkpoint.msgpack")
    assert 2 <= checkpoint.round < 4
    assert checkpoint.topology == text
    resumed = await run_federation(topo, out=out, resume=checkpoint)
    # Assert
    assert resumed.server.success, resumed.server.reason
    assert resumed.run_id == checkpoint.run
    for name, array in full.weights.items():
        assert resumed.weights[name].tobytes() == np.asarray(array).tobytes()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["model_sha256"]
        == json.loads((tmp_path / "full" / "summary.json").read_text())["model_sha256"]
    )
    assert summary["rounds_completed"] == 4


class _Gated:
    """Holds every fit after a client's first until the gate opens (deterministic timing)."""

    def __init__(self, inner: Trainer, gate: threading.Event) -> None:
        self.inner, self.gate, self.calls = inner, gate, 0
        self.train = getattr(inner, "train", None)

    def initial_weights(self, seed: int) -> dict[str, np.ndarray[Any, Any]]:
        return self.inner.initial_weights(seed)

    def fit(self, weights: Mapping[str, np.ndarray[Any, Any]], config: FitConfig) -> FitResult:
        self.calls += 1
        if self.calls > 1:
            assert self.gate.wait(timeout=20), "the late joiner never joined"
        return self.inner.fit(weights, config)

    def evaluate(self, weights: Mapping[str, np.ndarray[Any, Any]]) -> Any:
        return self.inner.evaluate(weights)


class _Watch(ServerObserver):
    def __init__(self, gate: threading.Event, start_late: asyncio.Event) -> None:
        self.gate, self.start_late = gate, start_late
        self.rows: list[Mapping[str, Any]] = []

    def on_joined(self, joined: int, expected: int | None) -> None:
        if joined == 4:
            self.gate.set()

    def on_round(self, row: Mapping[str, Any]) -> None:
        self.rows.append(row)
        self.start_late.set()


async def test_a_late_joiner_is_selected_from_the_next_round(tmp_path: Path) -> None:
    # Prepare: 4 clients declared, 3 started; round 1 begins at the join deadline.
    topo, _ = topology(
        clients=4, rounds=3, extra_protocol="  min_clients: 2\n",
        external="  external: [client-3]",
    )  # fmt: skip
    topo = dataclasses.replace(
        topo, protocol=dataclasses.replace(topo.protocol, join_timeout_s=0.5)
    )
    data = build_data(topo, tmp_path)
    gate, start_late = threading.Event(), asyncio.Event()
    watch = _Watch(gate, start_late)
    async with open_bus(topo) as bus:

        def connect_as(node: str) -> Any:
            def connect(will: Will) -> Transport:
                return bus.connect(node, will)

            return connect

        server = make_server(
            topo, data, bus.connect("server", None), run_id="late-1", out=None, observer=watch
        )
        clients = [
            ClientNode(
                _Gated(client_trainer(topo, data, f"client-{i}"), gate),
                connect_as(f"client-{i}"),
                client_settings(topo, f"client-{i}"),
            )
            for i in range(3)
        ]
        late = ClientNode(
            client_trainer(topo, data, "client-3"), connect_as("client-3"),
            client_settings(topo, "client-3"),
        )  # fmt: skip

        async def late_start() -> Any:
            await start_late.wait()  # round 1 closed without client-3
            return await late.run()

        # Execute
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c.run()) for c in clients]
            late_task = tg.create_task(late_start())
            outcome = await server.run()
    # Assert
    assert outcome.success, outcome.reason
    assert [r["participants"] for r in watch.rows] == [3, 3, 4]
    assert late_task.result().status == "finished"
    assert {t.result().status for t in tasks} == {"finished"}

"""MIFA in a real federation: dropped clients' updates stand in, and --resume keeps them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.launch import run_federation
from fedbus.nodes import ServerObserver, read_checkpoint
from fedbus.topology import load_topology
from tests.nodes.conftest import topology

pytestmark = pytest.mark.timeout(90)

FAULTS = "faults:\n  - {kind: dropout, probability: 0.4}\n"
PROTOCOL = "  min_clients: 1\n  aggregator: {kind: mifa, max_staleness: 2}"


class _CancelAfter(ServerObserver):
    def __init__(self, task: asyncio.Task[Any], round_num: int) -> None:
        self.task, self.round_num = task, round_num

    def on_round(self, row: Mapping[str, Any]) -> None:
        if row["round"] == self.round_num:
            self.task.cancel()  # as Ctrl-C does to fedbus run


async def test_mifa_run_with_dropouts_resumes_bit_for_bit(tmp_path: Path) -> None:
    # Prepare: 5 clients, dropout 0.4, rounds close at a 1 s deadline with who answered.
    topo, text = topology(clients=5, rounds=4, seed=2, round_timeout_s=1,
                          extra_protocol=PROTOCOL, faults=FAULTS)  # fmt: skip
    full = await run_federation(topo, out=tmp_path / "full")
    assert full.server.success, full.server.reason
    rows = [json.loads(s) for s in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["dropped"] for r in rows[1:3])  # someone's stored update stood in
    # Execute: interrupt after round 2, then resume from the checkpoint.
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
    assert any(k.startswith("delta/client-") for k in checkpoint.aggregator_state)
    resumed = await run_federation(topo, out=out, resume=checkpoint)
    # Assert: the resumed run ends on the uninterrupted run's weights, to the bit.
    assert resumed.server.success, resumed.server.reason
    for name, array in full.weights.items():
        assert resumed.weights[name].tobytes() == np.asarray(array).tobytes()


def test_the_mifa_faults_example_is_the_faults_example_plus_the_aggregator() -> None:
    examples = Path(__file__).parents[2] / "examples"
    plain = load_topology(examples / "faults.yaml")
    mifa = load_topology(examples / "faults-mifa.yaml")
    assert mifa.protocol.aggregator.as_dict() == {"kind": "mifa", "server_lr": 1.5}
    assert (
        dataclasses.replace(mifa.protocol, aggregator=plain.protocol.aggregator) == plain.protocol
    )
    assert (mifa.data, mifa.model, mifa.training, mifa.faults, mifa.seed) == (
        plain.data, plain.model, plain.training, plain.faults, plain.seed,
    )  # fmt: skip

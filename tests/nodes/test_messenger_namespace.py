"""The messenger options the node runtimes rely on: strict_run, retained broadcasts."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fedbus.messages import Manifest, ModelBroadcast, Tensor
from fedbus.transport.memory import MemoryBus
from fedbus.transport.messenger import Incoming, Messenger

pytestmark = pytest.mark.timeout(20)


async def _next(m: Messenger) -> Incoming:
    async with asyncio.timeout(5):
        return await anext(m.messages())


async def test_strict_run_off_delivers_every_envelope_run_in_the_namespace() -> None:
    bus = MemoryBus()
    async with (
        bus.transport("server") as ts,
        bus.transport("client-0") as tc,
        Messenger(ts, node_id="server", run="ns") as server,
        Messenger(tc, node_id="client-0", run="ns", strict_run=False) as client,
        bus.transport("client-1") as tc1,
        Messenger(tc1, node_id="client-1", run="ns") as strict,
    ):
        await client.subscribe_broadcasts("server", "manifest")
        await strict.subscribe_broadcasts("server", "manifest")
        await server.broadcast(
            Manifest(run="ns-1234abcd", sender="server", state="waiting"), "manifest"
        )
        _, got = await _next(client)
        assert got.run == "ns-1234abcd"
        await server.broadcast(Manifest(run="ns", sender="server", state="waiting"), "manifest")
        _, got = await _next(strict)
        assert got.run == "ns"
        assert strict.stats.dropped["foreign_run"] == 1


async def test_retained_manifest_reaches_late_subscribers_until_cleared() -> None:
    bus = MemoryBus()
    async with bus.transport("server") as ts, Messenger(ts, node_id="server", run="ns") as server:
        await server.broadcast(
            Manifest(run="r1", sender="server", state="collecting"), "manifest", retain=True
        )
        async with (
            bus.transport("late") as tl,
            Messenger(tl, node_id="late", run="ns", strict_run=False) as late,
        ):
            await late.subscribe_broadcasts("server", "manifest")
            _, got = await _next(late)
            assert isinstance(got, Manifest)
            assert got.state == "collecting"
            await server.clear_retained("manifest")
            await asyncio.sleep(0.01)
            assert late.stats.dropped["malformed"] == 0
        assert bus.retained == {}


async def test_retain_refuses_a_message_that_needs_chunks() -> None:
    bus = MemoryBus()
    async with (
        bus.transport("server", max_payload_bytes=2048) as ts,
        Messenger(ts, node_id="server", run="ns") as server,
    ):
        big = {"w": Tensor.from_array(np.zeros(4096, np.float32))}
        with pytest.raises(ValueError, match="chunks"):
            await server.broadcast(
                ModelBroadcast(run="r", sender="server", weights=big), "model", retain=True
            )
        assert bus.retained == {}

"""LeanMqttTransport with third-party clients: mosquitto_pub writes, mosquitto_sub reads.

Nothing fedbus-made sits on the other side, so a symmetric encoding mistake
(ours on both ends) cannot pass here.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fedbus.broker import ManagedBroker
from fedbus.transport.base import Received, Will
from fedbus.transport.lean import LeanMqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

WAIT_S = 10.0


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt install mosquitto-clients)")
    return path


async def _next(stream: AsyncIterator[Received]) -> Received:
    async with asyncio.timeout(WAIT_S):
        return await anext(stream)


async def mosquitto_pub(broker: ManagedBroker, topic: str, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        tool("mosquitto_pub"),
        *("-h", "127.0.0.1", "-p", str(broker.port), "-t", topic, *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT_S):
        _, err = await proc.communicate()
    assert proc.returncode == 0, err


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
async def test_receives_what_mosquitto_pub_sends(
    mosquitto: ManagedBroker, unique_prefix: str, version: str, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(300_000))
    config = mosquitto.client_config()
    async with LeanMqttTransport(config, f"{unique_prefix}-lean") as lean:
        await lean.subscribe(f"{unique_prefix}/#")
        stream = lean.messages()
        v = ("-V", version)
        await mosquitto_pub(mosquitto, f"{unique_prefix}/q1", "-q", "1", "-m", "héllo", *v)
        await mosquitto_pub(mosquitto, f"{unique_prefix}/q0", "-q", "0", "-m", "", *v)
        await mosquitto_pub(mosquitto, f"{unique_prefix}/big", "-q", "1", "-f", str(big), *v)
        got = [await _next(stream) for _ in range(3)]
    assert got == [
        Received(f"{unique_prefix}/q1", "héllo".encode(), qos=1, retain=False),
        Received(f"{unique_prefix}/q0", b"", qos=0, retain=False),
        Received(f"{unique_prefix}/big", big.read_bytes(), qos=1, retain=False),
    ]


async def test_retained_from_mosquitto_pub(mosquitto: ManagedBroker, unique_prefix: str) -> None:
    topic = f"{unique_prefix}/kept"
    await mosquitto_pub(mosquitto, topic, "-q", "1", "-r", "-m", "manifest")
    try:
        async with LeanMqttTransport(mosquitto.client_config(), f"{unique_prefix}-l") as lean:
            await lean.subscribe(topic)
            assert await _next(lean.messages()) == Received(topic, b"manifest", 1, True)
    finally:
        await mosquitto_pub(mosquitto, topic, "-r", "-n")  # clear it


async def test_mosquitto_sub_reads_publishes_and_the_will(
    mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    config = mosquitto.client_config()
    ready = f"{unique_prefix}/ready"
    payload = os.urandom(100_000)
    async with LeanMqttTransport(config, f"{unique_prefix}-marker") as marker:
        # A retained marker the broker sends only once mosquitto_sub's SUBSCRIBE is in place.
        await marker.publish(ready, b"1", retain=True)
        proc = await asyncio.create_subprocess_exec(
            tool("mosquitto_sub"),
            *("-h", "127.0.0.1", "-p", str(mosquitto.port), "-V", "mqttv311", "-q", "1"),
            *("-t", f"{unique_prefix}/data/#", "-t", ready, "-C", "5", "-W", "20"),
            *("-F", "%t %r %q %x"),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            limit=1 << 22,
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(WAIT_S):
                first = await proc.stdout.readline()
            assert first.decode().split()[0] == ready
            node = LeanMqttTransport(
                config, f"{unique_prefix}-node", will=Will(f"{unique_prefix}/data/will", b"gone")
            )
            async with node:
                await node.publish(f"{unique_prefix}/data/a", b"qos1")
                await node.publish(f"{unique_prefix}/data/b", b"qos0", qos=0)
                await node.publish(f"{unique_prefix}/data/c", payload)
                await node.abort()
            async with asyncio.timeout(WAIT_S):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await marker.publish(ready, b"", retain=True)
    lines = [line.split(" ") for line in out.decode().splitlines()]
    assert [(t, r, q, bytes.fromhex(x)) for t, r, q, x in lines] == [
        (f"{unique_prefix}/data/a", "0", "1", b"qos1"),
        (f"{unique_prefix}/data/b", "0", "0", b"qos0"),
        (f"{unique_prefix}/data/c", "0", "1", payload),
        (f"{unique_prefix}/data/will", "0", "1", b"gone"),
    ]

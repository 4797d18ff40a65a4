"""fedbus traffic read and written by third-party tools: mosquitto_sub, mosquitto_pub, msgpack-python.

Nothing here uses fedbus to check fedbus: what a Messenger broadcasts is
captured by mosquitto_sub and decoded by msgpack-python against the
structure docs/wire-format.md describes, and the golden vectors, published
byte for byte by mosquitto_pub, must come out of a Messenger as messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import subprocess
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import numpy as np
import pytest

from fedbus import codec, topics
from fedbus.broker import ManagedBroker
from fedbus.flow import TransferLimits
from fedbus.messages import ModelBroadcast, Tensor
from fedbus.transport.messenger import Incoming, Messenger
from fedbus.transport.mqtt import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

WAIT_S = 10.0
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
ENVELOPE = ["kind", "v", "run", "round", "sender", "id"]
FOR_EVERYONE = {"join", "leave", "heartbeat", "model", "manifest"}  # "out" topics; the rest "to"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt install mosquitto-clients)")
    return path


@contextlib.asynccontextmanager
async def mosquitto_sub(
    broker: ManagedBroker, *filters: str, ready_topic: str
) -> AsyncIterator[AsyncIterator[tuple[str, bytes]]]:
    """Run mosquitto_sub on ``filters``; yield an iterator of (topic, payload).

    Returns once it is subscribed: ``ready_topic`` holds a retained message,
    which the broker sends only after the subscription (listed last) is in place.
    """
    proc = await asyncio.create_subprocess_exec(
        tool("mosquitto_sub"),
        *("-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-V", "mqttv311"),
        *(arg for f in (*filters, ready_topic) for arg in ("-t", f)),
        *("-F", "%t %x", "-W", "30"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        limit=1 << 22,
    )

    async def lines() -> AsyncIterator[tuple[str, bytes]]:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            topic, _, payload = line.decode().rstrip("\n").partition(" ")
            yield topic, bytes.fromhex(payload)

    try:
        stream = lines()
        async with asyncio.timeout(WAIT_S):
            topic, _ = await anext(stream)
        assert topic == ready_topic
        yield stream
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def mosquitto_pub(broker: ManagedBroker, topic: str, file: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        tool("mosquitto_pub"),
        *("-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", topic, "-f", str(file)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(WAIT_S):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()


async def test_mosquitto_sub_and_msgpack_python_read_a_broadcast(
    mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    # Prepare: a small model (one packet) and a larger one (chunked at 4 KiB).
    run, server = f"r-{unique_prefix}", f"{unique_prefix}-server"
    ready = f"{unique_prefix}/ready"
    w = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    b = np.array([-1, 0, 1], dtype=np.int8)
    small = ModelBroadcast(
        run=run,
        round=2,
        sender=server,
        weights={"w": Tensor.from_array(w), "b": Tensor.from_array(b)},
        config={"epochs": 1, "lr": 0.5},
    )
    big_w = np.random.default_rng(1).standard_normal(5000, dtype=np.float32)
    big = ModelBroadcast(run=run, round=2, sender=server, weights={"w": Tensor.from_array(big_w)})
    config = mosquitto.client_config(max_payload_bytes=4096)
    async with (
        MqttTransport(config, server) as transport,
        Messenger(transport, node_id=server, run=run, prefix=unique_prefix) as messenger,
    ):
        await transport.publish(ready, b"1", retain=True)
        try:
            async with mosquitto_sub(
                mosquitto,
                topics.broadcast_filter(run, server, prefix=unique_prefix),
                ready_topic=ready,
            ) as stream:
                # Execute
                async with asyncio.timeout(WAIT_S):
                    await messenger.broadcast(small, "model")
                    await messenger.broadcast(big, "model")
                    first_topic, first = await anext(stream)
                    chunks = [msgpack.unpackb((await anext(stream))[1])]
                    while len(chunks) < chunks[0]["count"]:
                        chunks.append(msgpack.unpackb((await anext(stream))[1]))
        finally:
            await transport.publish(ready, b"", retain=True)

    # Assert: the documented topic and structure, field order included.
    assert first_topic == topics.broadcast(run, server, "model", prefix=unique_prefix)
    plain: dict[str, Any] = msgpack.unpackb(first)
    # Every field of the schema, in its order, envelope first (wire-format section 2);
    # optional fields left unset (``extras``) are left off the wire.
    schema = [
        f.encode_name
        for f in msgspec.structs.fields(ModelBroadcast)
        if f.default is not msgspec.UNSET
    ]
    assert list(plain) == ["kind", *schema]
    assert list(plain)[: len(ENVELOPE)] == ENVELOPE
    assert {k: plain[k] for k in [*ENVELOPE, "weights", "encoding", "config"]} == {
        "kind": "model",
        "v": 1,
        "run": run,
        "round": 2,
        "sender": server,
        "id": small.id,
        "weights": {
            "w": {"dtype": "float32", "shape": [2, 3], "data": w.astype("<f4").tobytes()},
            "b": {"dtype": "int8", "shape": [3], "data": b.tobytes()},
        },
        "encoding": "dense",
        "config": {"epochs": 1, "lr": 0.5},
    }
    # The chunked one: section 8's rules, checked with nothing but the standard library.
    # Chunks of one transfer may be published concurrently: order them by index.
    chunks.sort(key=lambda c: c["index"])
    assert [c["index"] for c in chunks] == list(range(chunks[0]["count"]))
    assert len(chunks) > 1
    for c in chunks:
        assert list(c)[: len(ENVELOPE)] == ENVELOPE
        assert (c["kind"], c["sender"], c["run"], c["xfer"]) == (
            "chunk",
            server,
            run,
            chunks[0]["xfer"],
        )
        assert c["crc"] == zlib.crc32(c["data"])
    payload = b"".join(c["data"] for c in chunks)
    assert len(payload) == chunks[0]["size"]
    table = len(payload).to_bytes(8, "big") + b"".join(c["crc"].to_bytes(4, "big") for c in chunks)
    # The last chunk carries the chunk-table digest; the others may carry it or an empty bin.
    digest = hashlib.sha256(table).digest()
    assert chunks[-1]["digest"] == digest
    assert all(c["digest"] in (b"", digest) for c in chunks[:-1])
    inner = msgpack.unpackb(payload)
    assert (inner["kind"], inner["id"]) == ("model", big.id)
    assert inner["weights"]["w"]["data"] == big_w.astype("<f4").tobytes()


async def test_mosquitto_pub_golden_vectors_reach_a_messenger(
    mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    # Prepare: a node of the golden vectors' run; each vector is published by
    # mosquitto_pub on the topic its sender would use.
    spec = json.loads((GOLDEN / "vectors.json").read_text())
    kinds = {
        v["file"]: (v["kind"], v["fields"]["sender"], v["fields"]["run"]) for v in spec["vectors"]
    }
    me = f"{unique_prefix}-node"
    run = "run-1"
    limits = TransferLimits(request_gap_s=5.0)  # no chunk requests: both chunks are sent
    async with (
        MqttTransport(mosquitto.client_config(), me) as transport,
        Messenger(transport, node_id=me, run=run, prefix=unique_prefix, limits=limits) as node,
    ):
        for sender in ("client-0", "server"):
            await node.subscribe_broadcasts(sender)
        expected = []
        # Execute
        for file, (kind, sender, vector_run) in kinds.items():
            if file == "chunked_payload.msgpack":
                continue  # travels as chunk_0 and chunk_1
            topic = (
                topics.broadcast(run, sender, kind, prefix=unique_prefix)
                if kind in FOR_EVERYONE
                else topics.directed(run, me, sender, prefix=unique_prefix)
            )
            await mosquitto_pub(mosquitto, topic, GOLDEN / file)
            if file == "chunk_1.msgpack":
                expected.append(codec.decode((GOLDEN / "chunked_payload.msgpack").read_bytes()))
            elif vector_run == run and kind not in ("chunk", "chunk_request", "credit"):
                expected.append(codec.decode((GOLDEN / file).read_bytes()))
        got: list[Incoming] = []
        async with asyncio.timeout(WAIT_S):
            async for item in node.messages():
                got.append(item)
                if len(got) == len(expected):
                    break

    # Assert: every message kind came through, in order, equal to the file's decoding.
    assert [item.message for item in got] == expected
    assert {item.message.KIND for item in got} >= {
        "join",
        "leave",
        "heartbeat",
        "model",
        "update",
        "ack",
    }
    # update.msgpack belongs to run "r1": dropped; the chunk request names a
    # transfer this node never sent: counted, not answered.
    assert dict(node.stats.dropped) == {"foreign_run": 1, "unanswerable_request": 1}
    assert node.stats.transfers_completed == 1

"""The MicroPython client's logic under CPython: golden vectors, chunks, training parity, protocol.

The modules in firmware_clients/micropython are written for MicroPython; they
import here as plain modules, with tests/firmware/umqtt_standin.py (or a
recording fake) in place of umqtt.simple.
"""

from __future__ import annotations

import importlib
import os
import sys
import zlib
from array import array
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import msgpack
import numpy as np
import pytest

from fedbus import codec
from fedbus.chunking import Reassembler, Status, transfer_digest
from fedbus.learning.data import Dataset, load_digits
from fedbus.learning.numpy_models import logistic_regression
from fedbus.learning.trainer import FitConfig
from fedbus.learning.trainers import NumpyTrainer
from fedbus.messages import (
    Ack,
    Chunk,
    Credit,
    Join,
    Manifest,
    ModelBroadcast,
    ModelUpdate,
    tensors_from_arrays,
)
from tests.firmware.firmware_helpers import (
    GOLDEN,
    MP_SOURCE,
    assert_same,
    comparable,
    exact_vectors,
    vectors,
)

VECTORS = vectors()
EXACT = exact_vectors()


@pytest.fixture(scope="module")
def mp() -> Iterator[dict[str, ModuleType]]:
    sys.path.insert(0, str(MP_SOURCE))
    try:
        yield {
            name: importlib.import_module(name)
            for name in ("fbmsgpack", "fbwire", "fbchunk", "fbtrain", "fbclient")
        }
    finally:
        sys.path.remove(str(MP_SOURCE))


def _from_fields(value: Any) -> Any:
    if isinstance(value, dict):
        if "$tensor" in value:
            t = value["$tensor"]
            return {"dtype": t["dtype"], "shape": t["shape"], "data": bytes.fromhex(t["data_hex"])}
        if "$bin" in value:
            return bytes.fromhex(value["$bin"])
        return {k: _from_fields(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_fields(v) for v in value]
    return value


def _to_fields(value: Any, mp: dict[str, ModuleType], key: str = "") -> Any:
    if isinstance(value, mp["fbmsgpack"].OMap | dict):
        items = list(value) if isinstance(value, list) else list(value.items())
        if key == "weights":
            return {
                name: {
                    "$tensor": {
                        "dtype": t["dtype"],
                        "shape": t["shape"],
                        "data_hex": bytes(t["data"]).hex(),
                    }
                }
                for name, t in items
            }
        return {k: _to_fields(v, mp, k) for k, v in items}
    if isinstance(value, list):
        return [_to_fields(v, mp) for v in value]
    if isinstance(value, memoryview | bytes):
        return {"$bin": bytes(value).hex()}
    return value


@pytest.mark.parametrize("vector", EXACT, ids=[v["file"] for v in EXACT])
def test_golden_encode(mp: dict[str, ModuleType], vector: dict[str, Any]) -> None:
    assert (
        mp["fbwire"].encode(_from_fields(vector["fields"]))
        == (GOLDEN / vector["file"]).read_bytes()
    )


@pytest.mark.parametrize("vector", VECTORS, ids=[v["file"] for v in VECTORS])
def test_golden_decode(mp: dict[str, ModuleType], vector: dict[str, Any]) -> None:
    decoded = mp["fbwire"].decode((GOLDEN / vector["file"]).read_bytes())
    assert_same(_to_fields(decoded, mp), comparable(vector["fields"]))
    # and decoding then encoding is byte exact (fields the client ignores are not kept)
    if vector in EXACT:
        assert mp["fbwire"].encode(decoded) == (GOLDEN / vector["file"]).read_bytes()


def test_decode_refusals(mp: dict[str, ModuleType]) -> None:
    wire, msgpack = mp["fbwire"], mp["fbmsgpack"]
    good = (GOLDEN / "credit.msgpack").read_bytes()
    with pytest.raises(wire.WireError):
        wire.decode(good + b"\x00")  # trailing bytes
    with pytest.raises(wire.WireError):
        wire.decode(good[:-1])  # truncated
    with pytest.raises(wire.VersionError):
        wire.decode(msgpack.packb({"kind": "credit", "v": 2}))
    with pytest.raises(wire.WireError):
        wire.decode(msgpack.packb({"kind": "teleport", "v": 1}))
    with pytest.raises(wire.WireError):
        wire.decode(bytes([0x81, 0xA1, 0x6B, 0xC0]))  # nil
    with pytest.raises(wire.WireError):
        wire.decode(b"\x91" * 40)  # nesting


def _plain(value: Any, m: ModuleType) -> Any:
    if isinstance(value, m.OMap):
        return {k: _plain(v, m) for k, v in value}
    if isinstance(value, list):
        return [_plain(v, m) for v in value]
    return bytes(value) if isinstance(value, memoryview) else value


def test_msgpack_round_trips(mp: dict[str, ModuleType]) -> None:
    import msgpack as reference

    m = mp["fbmsgpack"]
    values: list[Any] = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
    values += [-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]
    values += ["", "a" * 31, "a" * 32, "é" * 200, "b" * 65536, b"", b"x" * 256, b"y" * 70000]
    values += [True, False, 0.1, -2.5, [1, [2, [3]]], list(range(20)), {"k": {"n": 1.5}}]
    for v in values:
        packed = m.packb(v)
        assert packed == reference.packb(v, use_bin_type=True), v
        assert _plain(m.unpackb(packed), m) == v


def test_crc_and_digest(mp: dict[str, ModuleType]) -> None:
    chunk = mp["fbchunk"]
    data = os.urandom(3000)
    assert chunk.crc32_pure(b"123456789") == 0xCBF43926
    assert chunk.crc32_pure(data) == zlib.crc32(data) == chunk.crc32(data)
    crcs = [zlib.crc32(data[i : i + 700]) for i in range(0, 3000, 700)]
    assert chunk.table_digest(3000, crcs) == transfer_digest(3000, crcs)


def test_golden_chunks_reassemble(mp: dict[str, ModuleType]) -> None:
    wire, chunk = mp["fbwire"], mp["fbchunk"]
    c0 = wire.decode((GOLDEN / "chunk_0.msgpack").read_bytes())
    c1 = wire.decode((GOLDEN / "chunk_1.msgpack").read_bytes())
    payload = (GOLDEN / "chunked_payload.msgpack").read_bytes()
    rx = chunk.Rx(4096)
    assert rx.feed(c1, "client-0", 0) == chunk.ACCEPTED
    assert rx.feed(c1, "client-0", 1) == chunk.DUPLICATE
    assert rx.missing() == [0]
    assert rx.feed(c0, "client-0", 2) == chunk.COMPLETED
    assert bytes(rx.buf) == payload
    assert rx.feed(c0, "client-0", 3) == chunk.DUPLICATE
    # chunk 0 carries an empty digest, the last chunk the digest; in order too
    assert bytes(c0["digest"]) == b""
    rx = chunk.Rx(4096)
    assert rx.feed(c0, "client-0", 0) == chunk.ACCEPTED
    assert rx.feed(c1, "client-0", 1) == chunk.COMPLETED
    assert bytes(rx.buf) == payload
    # two different digests in one transfer: the later chunk is corrupt
    rx = chunk.Rx(4096)
    assert rx.feed(c1, "client-0", 0) == chunk.ACCEPTED
    assert rx.feed(dict(c0, digest=memoryview(bytes(32))), "client-0", 1) == chunk.CORRUPT
    assert rx.feed(dict(c0, digest=c1["digest"]), "client-0", 2) == chunk.COMPLETED
    # the wire rejects a last chunk without a digest, and other lengths
    raw = msgpack.unpackb((GOLDEN / "chunk_1.msgpack").read_bytes())
    for n in (0, 1, 31, 33):
        with pytest.raises(wire.WireError):
            wire.decode(msgpack.packb({**raw, "digest": bytes(n)}))
    # the MicroPython sender keeps the digest in every chunk (still valid)
    tx = chunk.Tx(payload, len(c0["data"]), "xfer-1")
    assert tx.digest == bytes(c1["digest"]) == bytes(tx.body(0)["digest"])
    assert tx.crcs == [c0["crc"], c1["crc"]]
    # a corrupt chunk is refused
    flipped = bytearray(c0["data"])
    flipped[-1] ^= 1
    bad = dict(c0, data=memoryview(bytes(flipped)))
    assert chunk.Rx(4096).feed(bad, "client-0", 0) == chunk.CORRUPT


def _digits(n: int) -> Dataset:
    data = load_digits()
    return Dataset(data.x[:n], data.y[:n], data.num_classes)


def _model(
    weights: dict[str, Any], config: dict[str, Any], selected: list[str], round_: int = 3
) -> ModelBroadcast:
    return ModelBroadcast(
        run="run-mp", round=round_, sender="server", id=f"model-{round_}",
        weights=tensors_from_arrays(weights), config=config, selected=selected,
    )  # fmt: skip


def _client(mp: dict[str, ModuleType], data: Dataset, fake: Any = None, **kwargs: Any) -> Any:
    x = data.x.reshape(len(data), -1).astype(np.float32)
    return mp["fbclient"].Client(
        "mp-0", "ns", array("f", x.tobytes()), bytearray(data.y.astype(np.uint8).tobytes()),
        x.shape[1], mqtt=fake if fake is not None else object(), log=None, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(("epochs", "lr", "mu"), [(3, 0.5, 0.0), (2, 0.2, 0.1)])
def test_training_matches_numpy_full_batch(
    mp: dict[str, ModuleType], epochs: int, lr: float, mu: float
) -> None:
    data = _digits(200)
    net = logistic_regression(64, 10)
    start = net.init(seed=5)
    client = _client(mp, data)
    model = mp["fbwire"].decode(
        codec.encode(_model(start, {"epochs": epochs, "lr": lr, "mu": mu}, ["mp-0"]))
    )
    answer = client.answer(model)
    update = codec.decode(mp["fbwire"].encode(answer))  # what fedbus would receive
    assert isinstance(update, ModelUpdate)
    assert update.reply_to == "model-3"
    assert update.num_examples == 200
    expected = NumpyTrainer(net, data).fit(
        start, FitConfig(epochs=epochs, batch_size=200, lr=lr, mu=mu)
    )
    diffs = {
        name: float(np.max(np.abs(update.weights[name].array - expected.weights[name])))
        for name in ("dense0.w", "dense0.b")
    }
    print(f"MicroPython parity (epochs={epochs}, lr={lr}, mu={mu}): max abs diff {diffs}")
    assert max(diffs.values()) < 1e-4, diffs
    assert float(np.max(np.abs(update.weights["dense0.w"].array - start["dense0.w"]))) > 1e-3
    assert update.metrics["train_loss"] == pytest.approx(expected.metrics["train_loss"], abs=1e-4)


class FakeMqtt:
    """Records publishes; the test plays the server."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, msg: bytes, retain: bool = False, qos: int = 0) -> None:
        self.published.append((topic, bytes(msg)))

    def take(self) -> list[tuple[str, Any]]:
        out = [(t, codec.decode(p)) for t, p in self.published]
        self.published.clear()
        return out


def test_protocol_with_chunks_both_ways(mp: dict[str, ModuleType]) -> None:
    data = _digits(60)
    fake = FakeMqtt()
    client = _client(mp, data, fake, max_payload_bytes=1024)
    server_out, inbox = "fedbus/ns/out/server", "fedbus/ns/to/mp-0/server"

    def deliver(topic: str, msg: Any, now: int) -> None:
        client.incoming.append((topic.encode(), codec.encode(msg)))
        client.step(now)

    deliver(
        f"{server_out}/manifest",
        Manifest(run="run-mp", sender="server", state="waiting_for_nodes"),
        0,
    )
    ((topic, join),) = fake.take()
    assert topic == "fedbus/ns/to/server/mp-0"
    assert isinstance(join, Join)
    assert join.num_examples == 60
    client.step(600)  # no ack within the backoff: the join is repeated
    ((_, join2),) = fake.take()
    assert isinstance(join2, Join)
    assert join2.id != join.id
    deliver(inbox, Ack(run="run-mp", sender="server", ref=join2.id), 700)
    client.step(10_000)
    assert fake.take() == []
    assert client.confirmed

    # the model broadcast in chunks, chunk 0 lost: the client asks for it
    net = logistic_regression(64, 10)
    payload = codec.encode(_model(net.init(0), {"epochs": 1, "lr": 0.1}, ["mp-0"], round_=1))
    from fedbus.chunking import split

    chunks = split(payload, max_chunk_data=700, xfer="bx", run="ns", sender="server", round=1)
    assert len(chunks) >= 4
    for c in reversed(chunks[1:]):
        deliver(f"{server_out}/model", c, 11_000)
    assert fake.take() == []
    client.step(12_100)
    ((topic, request),) = fake.take()
    assert topic == "fedbus/ns/to/server/mp-0"
    assert request.missing == [0]
    deliver(inbox, chunks[0], 12_200)  # the resend comes to the inbox

    # the update is chunked: a credit for the resend, then chunk 0 alone until credited
    sent = fake.take()
    assert isinstance(sent[0][1], Credit)
    assert isinstance(sent[1][1], Chunk)
    assert len(sent) == 2
    first: Chunk = sent[1][1]
    assert first.index == 0
    assert first.count >= 3
    for _, c in [*sent[1:]]:
        assert len(codec.encode(c)) + 10 + len("fedbus/ns/to/server/mp-0") + 2 <= 1024
    deliver(inbox, Credit(run="ns", sender="server", xfer=first.xfer, upto=first.count), 12_300)
    rest = [m for _, m in fake.take()]
    assert [c.index for c in rest] == list(range(1, first.count))
    reasm = Reassembler(max_transfers=4, max_bytes=1 << 20, timeout_s=60, max_message_bytes=1 << 20)
    results = [reasm.feed(c, sender="mp-0", now=0) for c in [first, *rest]]
    assert results[-1].status is Status.COMPLETED
    assert results[-1].payload is not None
    update = codec.decode(results[-1].payload)
    assert isinstance(update, ModelUpdate)
    assert update.round == 1
    assert update.reply_to == "model-1"

    # the same round again changes nothing; the finished manifest ends the client
    deliver(f"{server_out}/model", _model(net.init(0), {}, ["mp-0"], round_=1), 13_000)
    assert fake.take() == []
    deliver(
        f"{server_out}/manifest",
        Manifest(run="run-mp", round=1, sender="server", state="finished"),
        14_000,
    )
    assert client.done


def test_all_selected_answers_but_confirms_no_join(mp: dict[str, ModuleType]) -> None:
    """``selected: ["*"]`` asks every node to answer; only an ack or being named confirms a join."""
    data = _digits(20)
    fake = FakeMqtt()
    client = _client(mp, data, fake)
    server_out = "fedbus/ns/out/server"

    def deliver(topic: str, msg: Any, now: int) -> None:
        client.incoming.append((topic.encode(), codec.encode(msg)))
        client.step(now)

    deliver(
        f"{server_out}/manifest",
        Manifest(run="run-mp", sender="server", state="collecting", selected=["*"]),
        0,
    )
    assert [type(m) for _, m in fake.take()] == [Join]
    assert not client.confirmed
    net = logistic_regression(64, 10)
    deliver(f"{server_out}/model", _model(net.init(0), {"epochs": 1}, ["*"], round_=1), 100)
    ((topic, update),) = fake.take()
    assert topic == "fedbus/ns/to/server/mp-0"
    assert isinstance(update, ModelUpdate)
    assert update.reply_to == "model-1"
    assert not client.confirmed  # Joins go on until acknowledged
    deliver(f"{server_out}/model", _model(net.init(0), {}, ["other"], round_=2), 200)
    assert [type(m) for _, m in fake.take()] == []

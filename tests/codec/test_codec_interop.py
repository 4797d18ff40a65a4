"""Interoperability with msgpack-python, both ways: the wire format is plain MessagePack."""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import msgpack
import numpy as np
import pytest

from fedbus import codec
from fedbus.errors import DecodeError
from fedbus.messages import (
    Ack,
    Chunk,
    ChunkRequest,
    Credit,
    Heartbeat,
    Join,
    Leave,
    ModelBroadcast,
    ModelUpdate,
    Tensor,
    tensors_from_arrays,
)

ENV: dict[str, Any] = {"v": 1, "run": "run-1", "round": 2, "sender": "client-1", "id": "m-1"}


def _tensor(arr: np.ndarray[Any, Any]) -> dict[str, Any]:
    le = arr.astype(arr.dtype.newbyteorder("<"))
    return {"dtype": str(le.dtype.name), "shape": list(arr.shape), "data": le.tobytes()}


HAND_BUILT: list[dict[str, Any]] = [
    {"kind": "join", **ENV, "role": "client", "num_examples": 7, "capabilities": {"x": 1}},
    {"kind": "leave", **ENV, "reason": "done"},
    {"kind": "heartbeat", **ENV, "status": "alive", "metrics": {"loss": 0.25}},
    {
        "kind": "model",
        **ENV,
        "weights": {"w": _tensor(np.arange(6, dtype=np.float32).reshape(2, 3))},
        "encoding": "dense",
        "config": {"lr": 0.5},
        "selected": ["c-1", "c-2"],
    },
    {"kind": "update_failed", **ENV, "reason": "oom", "reply_to": "m-0"},
    {
        "kind": "manifest",
        **ENV,
        "state": "collecting",
        "attempt": 1,
        "completed_round": 1,
        "rounds": 5,
        "model_id": "m-0",
        "selected": ["c-1"],
    },
    {
        "kind": "update",
        **ENV,
        "weights": {"b": _tensor(np.array([1, -2], dtype=np.int16))},
        "num_examples": 3,
        "encoding": "delta",
        "reply_to": "m-0",
        "metrics": {},
    },
    {"kind": "ack", **ENV, "ref": "m-0", "status": "ok", "detail": ""},
    {
        "kind": "chunk",
        **ENV,
        "xfer": "x",
        "index": 0,
        "count": 1,
        "size": 3,
        "digest": hashlib.sha256(b"abc").digest(),
        "crc": zlib.crc32(b"abc"),
        "data": b"abc",
    },
    {"kind": "chunk_request", **ENV, "xfer": "x", "missing": [3, 4]},
    {"kind": "credit", **ENV, "xfer": "x", "upto": 8},
]


@pytest.mark.parametrize("plain", HAND_BUILT, ids=lambda d: d["kind"])
def test_msgpack_python_payload_decodes(plain: dict[str, Any]) -> None:
    payload = msgpack.packb(plain, use_bin_type=True)
    msg = codec.decode(payload)
    assert plain["kind"] == msg.KIND
    for key, value in plain.items():
        if key == "kind":
            continue
        got = getattr(msg, key)
        if key == "weights":
            assert {k: (t.dtype, t.shape, bytes(t.data)) for k, t in got.items()} == {
                k: (t["dtype"], t["shape"], t["data"]) for k, t in value.items()
            }
        elif isinstance(value, bytes):
            assert bytes(got) == value
        else:
            assert got == value
    # fedbus writes the same map back, in its own key order
    assert msgpack.unpackb(codec.encode(msg), raw=False) == plain


@pytest.mark.parametrize("plain", HAND_BUILT, ids=lambda d: d["kind"])
def test_key_order_does_not_matter(plain: dict[str, Any]) -> None:
    reordered = dict(reversed(list(plain.items())))
    assert codec.decode(msgpack.packb(reordered)) == codec.decode(msgpack.packb(plain))


def test_single_precision_floats_and_optional_fields() -> None:
    plain = {"kind": "heartbeat", "v": 1, "run": "r", "sender": "a", "id": "i"}
    plain["metrics"] = {"x": 0.5}
    msg = codec.decode(msgpack.packb(plain, use_single_float=True))
    assert isinstance(msg, Heartbeat)
    assert msg.metrics == {"x": 0.5}
    assert msg.round == 0
    assert msg.status == "alive"


def test_fedbus_payload_reads_with_msgpack_python() -> None:
    arr = np.arange(10, dtype=np.float64).reshape(2, 5)
    msg = ModelUpdate(
        run="r",
        round=3,
        sender="c",
        id="i",
        weights=tensors_from_arrays({"w": arr}),
        num_examples=4,
        metrics={"acc": 0.75, "n": 2, "ok": True, "tag": "t"},
    )
    plain = msgpack.unpackb(codec.encode(msg), raw=False, strict_map_key=True)
    assert list(plain) == [
        "kind",
        "v",
        "run",
        "round",
        "sender",
        "id",
        "weights",
        "num_examples",
        "encoding",
        "reply_to",
        "metrics",
    ]
    assert plain["kind"] == "update"
    assert plain["v"] == 1
    assert plain["metrics"] == {"acc": 0.75, "n": 2, "ok": True, "tag": "t"}
    w = plain["weights"]["w"]
    assert w["dtype"] == "float64"
    assert w["shape"] == [2, 5]
    assert isinstance(w["data"], bytes)
    assert np.array_equal(np.frombuffer(w["data"], "<f8").reshape(w["shape"]), arr)


@pytest.mark.parametrize(
    "msg",
    [
        Join(run="r", sender="a", id="i"),
        Leave(run="r", sender="a", id="i"),
        Ack(run="r", sender="a", id="i", ref="x"),
        Credit(run="r", sender="a", id="i", xfer="x", upto=1),
        ChunkRequest(run="r", sender="a", id="i", xfer="x", missing=[]),
        ModelBroadcast(run="r", sender="a", id="i", weights={}),
        Chunk(
            run="r",
            sender="a",
            id="i",
            xfer="x",
            index=0,
            count=1,
            size=0,
            digest=bytes(32),
            crc=0,
            data=memoryview(b""),
        ),
    ],
    ids=lambda m: m.KIND,
)
def test_no_extension_types_on_the_wire(msg: Any) -> None:
    def refuse_ext(code: int, data: bytes) -> Any:
        raise AssertionError(f"ext type {code} on the wire")

    plain = msgpack.unpackb(codec.encode(msg), raw=False, ext_hook=refuse_ext)
    assert plain["kind"] == msg.KIND


def test_tensor_data_as_str_is_rejected() -> None:
    plain = {
        "kind": "update",
        **ENV,
        "weights": {"w": {"dtype": "uint8", "shape": [2], "data": "ab"}},
    }
    with pytest.raises(DecodeError):
        codec.decode(msgpack.packb(plain))


def test_tensor_round_trip_through_msgpack_python() -> None:
    arr = np.linspace(-1, 1, 7, dtype=np.float16)
    t = Tensor.from_array(arr)
    plain = msgpack.unpackb(
        codec.encode(ModelUpdate(run="r", sender="a", weights={"h": t})), raw=False
    )
    again = codec.decode(msgpack.packb(plain))
    assert isinstance(again, ModelUpdate)
    assert np.array_equal(again.weights["h"].array, arr)

"""Property tests: decode never lets anything but DecodeError out; encode/decode round-trips."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedbus import codec
from fedbus.errors import DecodeError
from fedbus.messages import (
    DTYPES,
    Ack,
    AnyMessage,
    Chunk,
    ChunkRequest,
    Credit,
    Heartbeat,
    Join,
    Leave,
    Message,
    ModelBroadcast,
    ModelUpdate,
    Tensor,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOLDEN = [p.read_bytes() for p in sorted((Path(__file__).parents[1] / "golden").glob("*.msgpack"))]

# --- strategies ---------------------------------------------------------------

ids = st.text(min_size=1, max_size=128)
names = st.text(max_size=24)
u32 = st.integers(0, 2**32 - 1)
wire_ints = st.integers(-(2**63), 2**64 - 1)
scalars = st.one_of(st.booleans(), wire_ints, st.floats(allow_nan=False), st.text(max_size=16))
small_maps = st.dictionaries(names, scalars, max_size=5)


@st.composite
def tensors(draw: st.DrawFn) -> Tensor:
    name = draw(st.sampled_from(sorted(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
    arr = draw(hnp.arrays(DTYPES[name], shape))
    return Tensor.from_array(arr)


weights = st.dictionaries(names, tensors(), max_size=4)


def envelope(cls: type[Message], **body: Any) -> st.SearchStrategy[Message]:
    return st.builds(cls, run=ids, round=st.integers(0, 2**63), sender=ids, id=ids, **body)


messages: st.SearchStrategy[Message] = st.one_of(
    envelope(Join, role=names, num_examples=st.integers(0, 2**40), capabilities=small_maps),
    envelope(Leave, reason=names),
    envelope(Heartbeat, status=names, metrics=small_maps),
    envelope(ModelBroadcast, weights=weights, encoding=names, config=small_maps),
    envelope(
        ModelUpdate,
        weights=weights,
        num_examples=st.integers(0, 2**40),
        encoding=names,
        reply_to=st.text(max_size=128),
        metrics=small_maps,
    ),
    envelope(Ack, ref=ids, status=st.sampled_from(["ok", "rejected"]), detail=names),
    st.integers(1, 50).flatmap(
        lambda count: envelope(
            Chunk,
            xfer=ids,
            index=st.integers(0, count - 1),
            count=st.just(count),
            size=st.integers(0, 2**40),
            digest=st.binary(min_size=32, max_size=32),
            crc=u32,
            data=st.binary(max_size=64).map(memoryview),
        )
    ),
    envelope(ChunkRequest, xfer=ids, missing=st.lists(st.integers(0, 2**32), max_size=8)),
    envelope(Credit, xfer=ids, upto=u32),
)

# Plain MessagePack values, to reach schema validation with well-formed maps.
plain_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), wire_ints, st.floats(), st.text(max_size=8), st.binary(max_size=8)
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "kind",
        "v",
        "run",
        "round",
        "sender",
        "id",
        "weights",
        "dtype",
        "shape",
        "data",
        "xfer",
        "index",
        "count",
        "size",
        "digest",
        "crc",
        "missing",
        "upto",
        "ref",
        "status",
        "metrics",
    ]
)


def _decode_or_decode_error(payload: Any) -> None:
    try:
        msg = codec.decode(payload)
    except DecodeError:
        return
    assert isinstance(msg, AnyMessage.__args__)


# --- properties -----------------------------------------------------------------


@SETTINGS
@given(messages)
def test_round_trip(msg: Message) -> None:
    payload = codec.encode(msg)
    decoded = codec.decode(payload)
    assert decoded == msg
    assert codec.encode(decoded) == payload
    assert msgpack.unpackb(payload, raw=False)["kind"] == msg.KIND


@SETTINGS
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data: bytes) -> None:
    _decode_or_decode_error(data)


@SETTINGS
@given(
    kind=st.sampled_from([c.KIND for c in AnyMessage.__args__] + ["nope"]),
    v=st.sampled_from([1, 1, 1, 2, "1", None]),
    extra=st.dictionaries(field_names | st.text(max_size=6), plain_values, max_size=8),
)
def test_arbitrary_maps(kind: str, v: Any, extra: dict[str, Any]) -> None:
    plain = {"kind": kind, "v": v, "run": "r", "sender": "s", "id": "i", **extra}
    _decode_or_decode_error(msgpack.packb(plain, use_bin_type=True))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(GOLDEN) | messages.map(codec.encode)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xDD, 0xDF, 0xFF]))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


@SETTINGS
@given(mutated())
def test_mutated_valid_payloads(data: bytes) -> None:
    _decode_or_decode_error(data)


@SETTINGS
@given(messages, st.data())
def test_limits_are_honoured(msg: Message, data: st.DataObject) -> None:
    payload = codec.encode(msg)
    max_bytes = data.draw(st.integers(1, len(payload) + 8))
    limits = codec.DecodeLimits(max_bytes=max_bytes)
    try:
        codec.decode(payload, limits=limits)
    except DecodeError:
        assert len(payload) > max_bytes
    else:
        assert len(payload) <= max_bytes


def test_golden_corpus_is_present() -> None:
    assert len(GOLDEN) >= 9
    assert len({hashlib.sha256(g).digest() for g in GOLDEN}) == len(GOLDEN)


@SETTINGS
@given(tensors())
def test_tensor_array_round_trip(t: Tensor) -> None:
    payload = codec.encode(ModelUpdate(run="r", sender="s", weights={"t": t}))
    out = codec.decode(payload)
    assert isinstance(out, ModelUpdate)
    got = out.weights["t"].array
    assert got.shape == tuple(t.shape)
    assert got.tobytes() == t.array.tobytes()
    assert not got.flags.writeable
    if got.size:
        assert np.shares_memory(got, np.frombuffer(payload, np.uint8))

"""Malformed, truncated, oversize and incompatible payloads: DecodeError and nothing else."""

from __future__ import annotations

import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest

from fedbus import codec
from fedbus.errors import DecodeError, IncompatibleVersion, WireError
from fedbus.messages import Ack, Chunk, ModelUpdate, tensors_from_arrays

ENV: dict[str, Any] = {"kind": "leave", "v": 1, "run": "r", "round": 0, "sender": "a", "id": "i"}


def _pack(**fields: Any) -> bytes:
    return msgpack.packb({**ENV, **fields})


def _update(**tensor: Any) -> bytes:
    t = {"dtype": "float32", "shape": [2], "data": b"\0" * 8, **tensor}
    return _pack(kind="update", weights={"w": t})


def test_decode_error_family() -> None:
    assert issubclass(IncompatibleVersion, DecodeError)
    assert issubclass(DecodeError, WireError)


def test_unknown_fields_are_ignored() -> None:
    msg = codec.decode(_pack(reason="x", future={"nested": [1, b"bin", None, 2.5]}, z=None))
    assert msg == codec.decode(_pack(reason="x"))


def test_the_message_id_is_required_on_the_wire() -> None:
    # the class would invent a random id, which would defeat duplicate detection
    with pytest.raises(DecodeError, match="no id"):
        codec.decode(msgpack.packb({k: v for k, v in ENV.items() if k != "id"}))
    with pytest.raises(DecodeError):
        codec.decode(_pack(id=5))


def test_round_is_optional_and_defaults_to_zero() -> None:
    msg = codec.decode(msgpack.packb({k: v for k, v in ENV.items() if k != "round"}))
    assert msg.round == 0


def test_unknown_kind_is_a_decode_error_not_a_version_error() -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(_pack(kind="teleport"))
    assert not isinstance(info.value, IncompatibleVersion)


@pytest.mark.parametrize("version", [0, 2, 99, -1])
def test_other_major_versions_are_incompatible(version: int) -> None:
    with pytest.raises(IncompatibleVersion) as info:
        codec.decode(_pack(v=version))
    assert info.value.version == version


def test_incompatible_version_is_refused_even_with_an_unknown_body() -> None:
    # a v2 message may have kinds and fields we cannot know: the version wins
    with pytest.raises(IncompatibleVersion):
        codec.decode(_pack(v=2, kind="hologram", run=["not", "a", "str"]))


def test_ext_types_in_known_fields_are_refused() -> None:
    with pytest.raises(DecodeError):
        codec.decode(_pack(reason=msgpack.ExtType(1, b"xy")))


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(DecodeError):
        codec.decode(_pack() + b"\xc0")


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2, 3]),
        msgpack.packb("leave"),
        msgpack.packb({"kind": "leave"}),
        msgpack.packb({"v": 1}),
        msgpack.packb({**ENV, 1: 2}),
        msgpack.packb({**ENV, "v": "1"}),
        msgpack.packb({**ENV, "v": 1.0}),
        msgpack.packb({**ENV, "v": True}),
        msgpack.packb({**ENV, "round": -1}),
        msgpack.packb({**ENV, "round": 1.5}),
        msgpack.packb({**ENV, "run": None}),
        msgpack.packb({**ENV, "run": ""}),
        msgpack.packb({**ENV, "kind": "ack"}),  # missing ref
        msgpack.packb({**ENV, "kind": "ack", "ref": "x", "status": "maybe"}),
        msgpack.packb({k: v for k, v in ENV.items() if k != "sender"}),
        msgpack.packb({k: v for k, v in ENV.items() if k != "run"}),
        msgpack.packb({k: v for k, v in ENV.items() if k != "kind"}),
    ],
)
def test_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        codec.decode(payload)


@pytest.mark.parametrize("field", ["run", "sender", "id"])
def test_ids_longer_than_128_characters_are_refused(field: str) -> None:
    assert codec.decode(_pack(**{field: "x" * 128}))
    with pytest.raises(DecodeError):
        codec.decode(_pack(**{field: "x" * 129}))


@pytest.mark.parametrize("value", ["text", 3, None, [1, 2], 1.5, object()])
def test_non_bytes_input(value: Any) -> None:
    with pytest.raises(DecodeError):
        codec.decode(value)


def test_released_buffer_is_a_decode_error() -> None:
    view = memoryview(_pack())
    view.release()
    with pytest.raises(DecodeError):
        codec.decode(view)


def test_every_truncation_of_a_small_message_is_a_decode_error() -> None:
    msg = ModelUpdate(
        run="r",
        sender="a",
        id="i",
        weights=tensors_from_arrays({"w": np.arange(3, dtype=np.float32)}),
        metrics={"loss": 0.5},
    )
    payload = codec.encode(msg)
    assert codec.decode(payload) == msg
    for cut in range(len(payload)):
        with pytest.raises(DecodeError):
            codec.decode(payload[:cut])


def test_oversize_payload_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = codec.encode(Ack(run="r", sender="a", ref="x"))
    limits = codec.DecodeLimits(max_bytes=len(payload) - 1)

    class MustNotParse:
        def decode(self, data: Any) -> Any:
            raise AssertionError("parsed an oversize payload")

    monkeypatch.setattr(codec, "_header_decoder", MustNotParse())
    monkeypatch.setattr(codec, "_decoder", MustNotParse())
    with pytest.raises(DecodeError, match="exceeds the limit"):
        codec.decode(payload, limits=limits)
    with pytest.raises(DecodeError, match="exceeds the limit"):
        codec.decode(b"\xff" * 100, limits=codec.DecodeLimits(max_bytes=99))


def test_payload_at_the_limit_is_accepted() -> None:
    payload = codec.encode(Ack(run="r", sender="a", ref="x"))
    assert codec.decode(payload, limits=codec.DecodeLimits(max_bytes=len(payload)))


def test_tensor_count_and_byte_limits() -> None:
    arrays = {f"t{i}": np.zeros(4, np.float32) for i in range(3)}
    payload = codec.encode(ModelUpdate(run="r", sender="a", weights=tensors_from_arrays(arrays)))
    assert codec.decode(payload, limits=codec.DecodeLimits(max_tensors=3, max_tensor_bytes=48))
    with pytest.raises(DecodeError, match="tensors exceed"):
        codec.decode(payload, limits=codec.DecodeLimits(max_tensors=2))
    with pytest.raises(DecodeError, match="tensor bytes exceed"):
        codec.decode(payload, limits=codec.DecodeLimits(max_tensor_bytes=47))


@pytest.mark.parametrize(
    "tensor",
    [
        {"data": b"\0" * 7},
        {"data": b"\0" * 9},
        {"shape": [3]},
        {"shape": [2, 2]},
        {"shape": []},
        {"dtype": "float128"},
        {"dtype": "bfloat16"},
        {"dtype": "<f4"},
        {"dtype": "FLOAT32"},
        {"shape": [1] * 9, "data": b"\0" * 4},
        {"shape": [-2]},
        {"shape": [2, -1]},
        {"shape": [2.0]},
        {"shape": "2"},
        {"data": [0, 0, 0, 0, 0, 0, 0, 0]},
        {"data": None},
    ],
)
def test_bad_tensors(tensor: dict[str, Any]) -> None:
    assert codec.decode(_update())  # the unmodified tensor is fine
    with pytest.raises(DecodeError):
        codec.decode(_update(**tensor))


def test_tensor_missing_a_field() -> None:
    plain = {**ENV, "kind": "update", "weights": {"w": {"dtype": "uint8", "shape": [0]}}}
    with pytest.raises(DecodeError):
        codec.decode(msgpack.packb(plain))


def test_eight_dimensions_are_allowed() -> None:
    assert codec.decode(_update(shape=[1] * 7 + [2]))


@pytest.mark.parametrize(
    "fields",
    [
        {"index": 2, "count": 2},
        {"count": 0, "index": 0},
        {"digest": b"\0" * 31},
        {"digest": b"\0" * 33},
        {"digest": b""},  # the last chunk (here the only one) must carry the digest
        {"count": 2, "digest": b"\0"},  # a non-last chunk: 32 bytes or empty
        {"count": 2, "digest": b"\0" * 31},
        {"crc": 2**32},
        {"crc": -1},
        {"size": -1},
        {"data": "text"},
    ],
)
def test_bad_chunks(fields: dict[str, Any]) -> None:
    good = {
        "kind": "chunk",
        "xfer": "x",
        "index": 0,
        "count": 1,
        "size": 1,
        "digest": b"\0" * 32,
        "crc": 0,
        "data": b"a",
    }
    assert codec.decode(_pack(**good))
    with pytest.raises(DecodeError):
        codec.decode(_pack(**{**good, **fields}))


def test_non_last_chunk_may_carry_an_empty_digest() -> None:
    fields = {"kind": "chunk", "xfer": "x", "index": 0, "count": 2, "size": 2, "crc": 0}
    chunk = codec.decode(_pack(**fields, digest=b"", data=b"a"))
    assert isinstance(chunk, Chunk)
    assert chunk.digest == b""


def test_deep_nesting_in_an_unknown_field_is_a_decode_error() -> None:
    # 0x91 = array of one element, 100k deep: must not blow the C stack
    head = msgpack.packb(ENV)
    payload = bytes([head[0] + 1]) + head[1:] + msgpack.packb("deep") + b"\x91" * 100_000 + b"\x00"
    with pytest.raises(DecodeError):
        codec.decode(payload)


def test_huge_declared_lengths_do_not_allocate() -> None:
    # array32 / map32 / bin32 / str32 headers claiming 4 GiB with a few bytes behind them
    head = msgpack.packb({**ENV, "kind": "chunk_request", "xfer": "x"})
    for claim in (b"\xdd", b"\xdf", b"\xc6", b"\xdb"):
        payload = (
            bytes([head[0] + 1]) + head[1:] + msgpack.packb("missing") + claim + b"\xff" * 4 + b"\0"
        )
        tracemalloc.start()
        try:
            with pytest.raises(DecodeError):
                codec.decode(payload)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, f"decoding a {len(payload)}-byte payload allocated {peak} bytes"


def test_peek_header() -> None:
    assert codec.peek_header(_pack(kind="credit", v=7)) == (7, "credit")
    with pytest.raises(DecodeError):
        codec.peek_header(b"\x80")

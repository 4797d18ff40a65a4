"""Round trips of every message kind, and how tensors enter and leave the codec."""

from __future__ import annotations

import hashlib
import importlib.abc
import math
import sys
import zlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import msgspec
import numpy as np
import pytest

from fedbus import codec
from fedbus.errors import ConfigError, EncodeError
from fedbus.messages import (
    DTYPES,
    FORMAT_VERSION,
    MAX_NDIM,
    Ack,
    AnyMessage,
    Chunk,
    ChunkRequest,
    Credit,
    Heartbeat,
    Join,
    Leave,
    Manifest,
    Message,
    ModelBroadcast,
    ModelUpdate,
    Tensor,
    UpdateFailure,
    new_message_id,
    tensors_from_arrays,
    tensors_to_arrays,
)

ENV: dict[str, Any] = {"run": "run-7", "round": 4, "sender": "client-3"}


def _weights() -> dict[str, Tensor]:
    rng = np.random.default_rng(0)
    return tensors_from_arrays(
        {
            "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "conv.bias": np.zeros(4, np.float32),
            "steps": np.int64(12),
        }
    )


def every_kind() -> list[Message]:
    payload = b"0123456789" * 3
    return [
        Join(**ENV, role="edge", num_examples=10, capabilities={"a": 1, "b": 2.5, "c": "x"}),
        Leave(**ENV, reason="bye"),
        Heartbeat(**ENV, status="idle", metrics={"ok": True, "n": -3}),
        ModelBroadcast(**ENV, weights=_weights(), config={"lr": 0.1}, selected=["a", "b"]),
        UpdateFailure(**ENV, reason="oom", reply_to="m"),
        Manifest(**ENV, state="collecting", completed_round=1, rounds=3, selected=["a"]),
        ModelUpdate(**ENV, weights=_weights(), num_examples=5, encoding="delta", reply_to="m"),
        Ack(**ENV, ref="abc", status="rejected", detail="late"),
        Chunk(
            **ENV,
            xfer="t1",
            index=1,
            count=3,
            size=90,
            digest=hashlib.sha256(b"whole").digest(),
            crc=zlib.crc32(payload),
            data=memoryview(payload),
        ),
        ChunkRequest(**ENV, xfer="t1", missing=[0, 2]),
        Credit(**ENV, xfer="t1", upto=3),
    ]


def test_every_kind_is_covered() -> None:
    assert {type(m) for m in every_kind()} == set(AnyMessage.__args__)


@pytest.mark.parametrize("message", every_kind(), ids=lambda m: m.KIND)
def test_round_trip(message: Message) -> None:
    payload = codec.encode(message)
    assert isinstance(payload, bytes)
    decoded = codec.decode(payload)
    assert type(decoded) is type(message)
    assert decoded == message
    assert codec.encode(decoded) == payload
    assert codec.peek_header(payload) == (FORMAT_VERSION, message.KIND)


@pytest.mark.parametrize("message", every_kind(), ids=lambda m: m.KIND)
def test_decode_accepts_bytearray_and_memoryview(message: Message) -> None:
    payload = codec.encode(message)
    assert codec.decode(bytearray(payload)) == message
    assert codec.decode(memoryview(payload)) == message


def test_envelope_defaults() -> None:
    msg = Leave(run="r", sender="a")
    assert msg.v == FORMAT_VERSION
    assert msg.round == 0
    assert len(msg.id) == 16
    assert msg.id != Leave(run="r", sender="a").id
    assert len({new_message_id() for _ in range(100)}) == 100


def test_encoding_is_deterministic_and_kind_comes_first() -> None:
    msg = Ack(run="r", sender="a", id="i", ref="x")
    assert codec.encode(msg) == codec.encode(Ack(run="r", sender="a", id="i", ref="x"))
    # fixmap, then "kind" as the first key
    assert codec.encode(msg)[1:6] == b"\xa4kind"


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(EncodeError):
        codec.encode({"kind": "leave"})  # type: ignore[arg-type]


def test_encode_refuses_out_of_range_ints() -> None:
    with pytest.raises(EncodeError):
        codec.encode(Heartbeat(run="r", sender="a", metrics={"n": 2**64}))


# --- tensors -----------------------------------------------------------------


def _sample(dtype: np.dtype[Any], shape: Sequence[int]) -> np.ndarray[Any, Any]:
    size = int(np.prod(shape))
    if dtype.kind == "b":
        return (np.arange(size) % 3 == 0).reshape(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        step = (int(info.max) - int(info.min)) // max(size - 1, 1)
        vals = [int(info.min) + i * step for i in range(size)]
        return np.array(vals, dtype=object).astype(dtype).reshape(shape)
    return np.linspace(-3.5, 7.25, size).astype(dtype).reshape(shape)


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 0, 3), (1,) * MAX_NDIM])
def test_every_dtype_round_trips(name: str, shape: tuple[int, ...]) -> None:
    arr = _sample(DTYPES[name], shape)
    msg = ModelUpdate(run="r", sender="a", weights={"t": Tensor.from_array(arr)})
    out = codec.decode(codec.encode(msg))
    assert isinstance(out, ModelUpdate)
    got = out.weights["t"].array
    assert got.dtype == DTYPES[name]
    assert got.shape == shape
    assert np.array_equal(got, arr)


def test_native_dtype_aliases_map_to_wire_names() -> None:
    for char, name in [("q", "int64"), ("l", "int64"), ("i", "int32"), ("e", "float16")]:
        assert Tensor.from_array(np.ones(2, dtype=char)).dtype == name


def test_decoded_tensor_is_a_read_only_view_of_the_payload() -> None:
    arr = np.arange(1000, dtype=np.float32)
    payload = codec.encode(
        ModelBroadcast(run="r", sender="s", weights=tensors_from_arrays({"w": arr}))
    )
    msg = codec.decode(payload)
    assert isinstance(msg, ModelBroadcast)
    view = msg.weights["w"].array
    assert np.shares_memory(view, np.frombuffer(payload, dtype=np.uint8))
    assert not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1.0
    assert np.array_equal(view, arr)
    assert np.array_equal(tensors_to_arrays(msg.weights)["w"], arr)


def test_from_array_does_not_copy_contiguous_little_endian() -> None:
    arr = np.arange(12, dtype="<f4").reshape(3, 4)
    t = Tensor.from_array(arr)
    assert np.shares_memory(t.array, arr)


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (5,), (2, 3), (1, 2, 1, 2)])
def test_from_array_fast_path_matches_the_general_path(name: str, shape: tuple[int, ...]) -> None:
    # A C-contiguous native array skips the general conversion (issue 3); a
    # 0-d or empty one takes the general path. Both must agree bit for bit.
    arr = (np.arange(math.prod(shape)) % 2).astype(DTYPES[name]).reshape(shape)
    arr.setflags(write=False)  # a read-only input is wrapped, not copied
    t = Tensor.from_array(arr)
    assert (t.dtype, t.shape) == (name, list(shape))
    assert bytes(t.data) == arr.tobytes()
    assert np.array_equal(t.array, arr)
    assert t.array.shape == shape
    assert not t.array.flags.writeable
    if arr.ndim and arr.size:  # a 0-d array's few bytes are copied
        assert np.shares_memory(t.array, arr)
    out = codec.decode(codec.encode(ModelUpdate(run="r", sender="a", weights={"t": t})))
    assert isinstance(out, ModelUpdate)
    assert np.array_equal(out.weights["t"].array, arr)


def test_big_endian_and_strided_inputs_are_converted() -> None:
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    t = Tensor.from_array(big)
    assert t.dtype == "int32"
    assert bytes(t.data) == np.arange(6, dtype="<i4").tobytes()
    fortran = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    strided = np.arange(20, dtype=np.int16)[::4]
    for arr in (fortran, strided, big.T):
        out = Tensor.from_array(arr)
        assert (
            bytes(out.data)
            == np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        )
        assert np.array_equal(out.array, arr)


@pytest.mark.parametrize(
    "value",
    [
        np.array([object(), 1], dtype=object),
        np.ones(3, dtype=np.complex64),
        np.ones(2, dtype="U3"),
        np.ones(2, dtype="datetime64[s]"),
        np.ones(2, dtype=np.longdouble) if np.dtype(np.longdouble).itemsize > 8 else np.array([1j]),
        np.zeros((1,) * (MAX_NDIM + 1), dtype=np.float32),
        [[1, 2], [3]],
        "text",
        object(),
    ],
    ids=["object", "complex", "str", "datetime", "longdouble", "ndim9", "ragged", "str-obj", "obj"],
)
def test_unsendable_values_raise_encode_error(value: Any) -> None:
    with pytest.raises(EncodeError):
        Tensor.from_array(value)


def test_tensor_checks_its_bytes() -> None:
    with pytest.raises(ValueError, match="needs 8 bytes"):
        Tensor(dtype="float32", shape=[2], data=memoryview(b"\0" * 4))
    with pytest.raises(ValueError, match="unknown tensor dtype"):
        Tensor(dtype="float128", shape=[1], data=memoryview(b"\0" * 16))


def test_tensor_accepts_any_bytes_like_data() -> None:
    raw = np.array([1.0, 2.0], "<f4").tobytes()
    for data in (raw, bytearray(raw), memoryview(np.frombuffer(raw, "<f4"))):
        t = Tensor(dtype="float32", shape=[2], data=data)  # type: ignore[arg-type]
        assert t.data.format == "B"
        assert t.array.tolist() == [1.0, 2.0]
        assert t == Tensor(dtype="float32", shape=[2], data=memoryview(raw))


def test_tensor_array_protocol() -> None:
    t = Tensor.from_array(np.arange(3, dtype=np.int32))
    assert np.asarray(t).tolist() == [0, 1, 2]
    assert np.asarray(t, dtype=np.float64).dtype == np.float64
    assert Tensor.from_array(t) == t


class FakeTorchTensor:
    """Quacks like torch.Tensor: detach().cpu().numpy(); no __array__."""

    def __init__(self, arr: np.ndarray[Any, Any]) -> None:
        self._arr = arr
        self.calls: list[str] = []

    def detach(self) -> FakeTorchTensor:
        self.calls.append("detach")
        return self

    def cpu(self) -> FakeTorchTensor:
        self.calls.append("cpu")
        return self

    def numpy(self) -> np.ndarray[Any, Any]:
        self.calls.append("numpy")
        return self._arr


class ArrayLike:
    """Exposes only __array__."""

    def __init__(self, arr: np.ndarray[Any, Any]) -> None:
        self._arr = arr

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray[Any, Any]:
        return self._arr


class _NoTorch(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> None:
        if fullname.split(".")[0] == "torch":
            self.attempts.append(fullname)
            raise ImportError("torch is blocked in this test")


def test_array_likes_encode_without_importing_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = _NoTorch()
    monkeypatch.setattr(sys, "meta_path", [blocker, *sys.meta_path])
    had_torch = "torch" in sys.modules
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    fake = FakeTorchTensor(arr)
    weights = tensors_from_arrays({"a": fake, "b": ArrayLike(arr * 2)})
    assert fake.calls == ["detach", "cpu", "numpy"]
    out = codec.decode(codec.encode(ModelUpdate(run="r", sender="a", weights=weights)))
    assert isinstance(out, ModelUpdate)
    assert np.array_equal(out.weights["a"].array, arr)
    assert np.array_equal(out.weights["b"].array, arr * 2)
    assert blocker.attempts == []
    assert ("torch" in sys.modules) == had_torch


def test_real_torch_tensors_encode() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).requires_grad_()
    weights = tensors_from_arrays({"w": t, "i": torch.tensor([1, 2], dtype=torch.int8)})
    out = codec.decode(codec.encode(ModelUpdate(run="r", sender="a", weights=weights)))
    assert isinstance(out, ModelUpdate)
    assert out.weights["w"].array.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert out.weights["i"].dtype == "int8"
    with pytest.raises(EncodeError):
        Tensor.from_array(torch.ones(2, dtype=torch.bfloat16))


def test_chunk_index_must_be_below_count() -> None:
    with pytest.raises(ValueError, match="not below"):
        Chunk(
            run="r",
            sender="a",
            xfer="x",
            index=2,
            count=2,
            size=0,
            digest=bytes(32),
            crc=0,
            data=memoryview(b""),
        )


def test_decode_limits_validate_themselves() -> None:
    with pytest.raises(ConfigError, match="max_bytes"):
        codec.DecodeLimits(max_bytes=0)
    assert isinstance(codec.DEFAULT_LIMITS, codec.DecodeLimits)


def test_messages_are_frozen() -> None:
    msg = Leave(run="r", sender="a")
    with pytest.raises(AttributeError):
        msg.run = "other"  # type: ignore[misc]
    assert msgspec.structs.replace(msg, reason="x").reason == "x"

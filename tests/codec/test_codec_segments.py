"""`codec.encode_segments`: the same bytes as `encode`, big tensors left in place."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus import codec
from fedbus.errors import EncodeError
from fedbus.messages import Heartbeat, ModelBroadcast, ModelUpdate, Tensor


def _update(sizes: list[int], dtype: str = "float32") -> ModelUpdate:
    rng = np.random.default_rng(len(sizes))
    weights = {
        f"layer{i}.w": Tensor.from_array(rng.random(n).astype(dtype)) for i, n in enumerate(sizes)
    }
    return ModelUpdate(run="r", round=3, sender="c1", weights=weights, num_examples=7)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 63, 16383, 16384, 16385, 70000]), max_size=5))
def test_segments_join_to_encode(sizes: list[int]) -> None:
    message = _update(sizes)
    segments = codec.encode_segments(message)
    assert b"".join(segments) == codec.encode(message)
    assert all(len(s) for s in segments)


def test_big_tensors_are_views_not_copies() -> None:
    message = _update([100_000, 10, 50_000])
    segments = codec.encode_segments(message)
    views = [s for s in segments if isinstance(s, memoryview) and len(s) >= codec.SEGMENT_MIN_BYTES]
    tensors = [message.weights["layer0.w"].data, message.weights["layer2.w"].data]
    assert len(views) == 2
    for view, data in zip(views, tensors, strict=True):
        assert np.shares_memory(np.asarray(view), np.asarray(data))


def test_messages_without_big_tensors_are_one_piece() -> None:
    for message in (
        Heartbeat(run="r", sender="s"),
        _update([10, 20]),
        ModelBroadcast(run="r", round=1, sender="s", weights={}),
    ):
        segments = codec.encode_segments(message)
        assert segments == [codec.encode(message)]


def test_decodes_like_encode() -> None:
    message = _update([200_000, 3], dtype="float64")
    decoded = codec.decode(b"".join(codec.encode_segments(message)))
    assert isinstance(decoded, ModelUpdate)
    assert decoded.id == message.id
    for name, tensor in message.weights.items():
        assert np.array_equal(decoded.weights[name].array, tensor.array)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65535, 65536, 70000, (1 << 32) - 1])
def test_bin_header_is_msgspecs(n: int) -> None:
    if n < 1 << 20:
        assert codec.bin_header(n) == msgspec.msgpack.encode(bytes(n))[: -n or None]
    assert len(codec.bin_header(n)) == (2 if n < 256 else 3 if n < 65536 else 5)


def test_bin_header_refuses_4_gib() -> None:
    with pytest.raises(EncodeError):
        codec.bin_header(1 << 32)


def test_not_a_message() -> None:
    with pytest.raises(EncodeError):
        codec.encode_segments({"weights": {}})  # type: ignore[arg-type]

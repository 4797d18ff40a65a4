"""MessagePack encode/decode of fedbus messages.

The sole importer of a MessagePack library in fedbus. msgspec is used because
it encodes and decodes tensor ``bin`` fields at about memcpy speed and decodes
them as memoryviews of the payload (no copy); msgpack-python measured 10x
slower on encode here (shared notes, codec table).

Decoding is bounded: the payload length is checked against `DecodeLimits`
before parsing, container lengths are capped by the schema, and the header is
read first so an unknown major version raises `IncompatibleVersion`. Every
failure surfaces as `DecodeError`; nothing else escapes `decode`, and there is
no pickle (or any object-constructing hook) on the decode path.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from fedbus.errors import ConfigError, DecodeError, EncodeError, IncompatibleVersion
from fedbus.messages import FORMAT_VERSION, AnyMessage, Message

__all__ = [
    "DEFAULT_LIMITS",
    "DecodeLimits",
    "Segment",
    "bin_header",
    "decode",
    "encode",
    "encode_segments",
    "peek_header",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeLimits:
    """Bounds applied before and after decoding a payload.

    Attributes:
        max_bytes: largest payload accepted at all (a reassembled chunked
            message counts as one payload).
        max_tensors: most tensors in one message.
        max_tensor_bytes: most bytes in all tensors of one message.
    """

    max_bytes: int = 1 << 30
    max_tensors: int = 65536
    max_tensor_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_tensors", "max_tensor_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive", path=name)


DEFAULT_LIMITS: Final = DecodeLimits()


class _Header(msgspec.Struct):
    # Only what is needed to route a payload; other fields are skipped cheaply
    # (a bin of any size is skipped without being read).
    v: int
    kind: str
    # Raw: not parsed here (its type is checked by the full decode); an empty
    # Raw means the field is absent. Checked only for our own major version.
    id: msgspec.Raw = msgspec.Raw()


_encoder: Final = msgspec.msgpack.Encoder()
_header_decoder: Final = msgspec.msgpack.Decoder(_Header)
_decoder: Final = msgspec.msgpack.Decoder(AnyMessage)


def encode(message: Message) -> bytes:
    """Encode a message to MessagePack bytes.

    Tensor bytes are copied once, into the output buffer.

    Raises:
        EncodeError: the message holds something the wire format cannot carry.
    """
    if not isinstance(message, Message):
        raise EncodeError(f"expected a fedbus message, got {type(message).__name__}")
    try:
        return _encoder.encode(message)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise EncodeError(f"cannot encode {type(message).__name__}: {exc}") from exc


Segment = bytes | memoryview
"""One piece of an encoded message (`encode_segments`)."""

SEGMENT_MIN_BYTES: Final = 1 << 16
"""Tensors with at least this many bytes are not copied by `encode_segments`."""

_MARKER_LEN: Final = 16


def bin_header(n: int) -> bytes:
    """The MessagePack header of a ``bin`` of ``n`` bytes, in its shortest form (as msgspec writes it)."""
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\xc6" + n.to_bytes(4, "big")
    raise EncodeError(f"a bin of {n} bytes exceeds MessagePack's 4 GiB limit")


def encode_segments(message: Message) -> list[Segment]:
    """Encode a message as pieces whose concatenation is exactly ``encode(message)``.

    Why: a chunked transfer copies every byte into its chunk anyway; encoding
    the whole message first was one more full copy (about 20 ms for 40 MB).
    Here the data of each tensor of at least `SEGMENT_MIN_BYTES` stays where
    it is: its piece is the tensor's own memoryview, between small encoded
    pieces. The caller must not modify those tensors while the pieces are in
    use (chunk CRCs are computed once, so a change is caught as corruption).

    Raises:
        EncodeError: as `encode`.
    """
    weights = getattr(message, "weights", None)
    if not isinstance(message, Message) or not isinstance(weights, dict):
        return [encode(message)]
    big = [name for name, t in weights.items() if t.data.nbytes >= SEGMENT_MIN_BYTES]
    if not big:
        return [encode(message)]
    stubs = dict(weights)
    tokens: list[bytes] = []
    for name in big:
        # Each big tensor's data becomes a random 16-byte bin, found again below.
        marker = os.urandom(_MARKER_LEN)
        stub = copy.copy(weights[name])
        msgspec.structs.force_setattr(stub, "data", memoryview(marker))
        stubs[name] = stub
        tokens.append(bin_header(_MARKER_LEN) + marker)
    head = encode(msgspec.structs.replace(message, weights=stubs))
    view = memoryview(head)
    out: list[Segment] = []
    pos = 0
    for name, token in zip(big, tokens, strict=True):
        at = head.find(token, pos)
        if at < 0 or head.find(token, at + 1) >= 0:  # cannot happen short of a 2^-128 fluke
            return [encode(message)]
        data = weights[name].data
        out += (view[pos:at], bin_header(data.nbytes), data)
        pos = at + len(token)
    out.append(view[pos:])
    return [s for s in out if len(s)]


def peek_header(data: bytes | bytearray | memoryview) -> tuple[int, str]:
    """Return ``(version, kind)`` of a payload without decoding its body.

    Raises:
        DecodeError: the payload has no readable header.
    """
    try:
        header = _header_decoder.decode(data)
    except Exception as exc:  # msgspec raises several types; all mean "malformed"
        raise DecodeError(f"malformed header: {exc}") from exc
    return header.v, header.kind


def decode(
    data: bytes | bytearray | memoryview, *, limits: DecodeLimits = DEFAULT_LIMITS
) -> AnyMessage:
    """Decode one message, validating it against the schema and the limits.

    Tensors in the result are views of ``data``: keep ``data`` immutable
    (``bytes``) if the views are to be read-only.

    Raises:
        IncompatibleVersion: the payload's major version is not ours.
        DecodeError: anything else wrong with the payload.
    """
    try:
        size = memoryview(data).nbytes
    except (TypeError, ValueError, BufferError) as exc:  # ValueError: a released view
        raise DecodeError(f"payload must be bytes-like, not {type(data).__name__}") from exc
    if size > limits.max_bytes:
        raise DecodeError(f"payload of {size} bytes exceeds the limit of {limits.max_bytes}")
    try:
        header = _header_decoder.decode(data)
    except Exception as exc:  # msgspec raises several types; all mean "malformed"
        raise DecodeError(f"malformed header: {exc}") from exc
    version, kind = header.v, header.kind
    if version != FORMAT_VERSION:
        raise IncompatibleVersion(
            f"format version {version} is not supported (this build reads {FORMAT_VERSION})",
            version=version,
        )
    if not len(header.id):
        # The message class would fill in a fresh random id, which would defeat
        # duplicate detection: on the wire the id is required.
        raise DecodeError(f"{kind!r} message has no id")
    try:
        message: AnyMessage = _decoder.decode(data)
    except Exception as exc:  # ValidationError, DecodeError, RecursionError...
        raise DecodeError(f"invalid {kind!r} message: {exc}") from exc
    _check_tensors(message, limits)
    return message


def _check_tensors(message: Any, limits: DecodeLimits) -> None:
    weights = getattr(message, "weights", None)
    if not weights:
        return
    tensors = list(weights.values())
    extras = getattr(message, "extras", None)
    if isinstance(extras, dict):  # further tensor sets count against the same limits
        tensors += [t for tset in extras.values() for t in tset.values()]
    if len(tensors) > limits.max_tensors:
        raise DecodeError(f"{len(tensors)} tensors exceed the limit of {limits.max_tensors}")
    total = sum(t.data.nbytes for t in tensors)
    if total > limits.max_tensor_bytes:
        raise DecodeError(f"{total} tensor bytes exceed the limit of {limits.max_tensor_bytes}")

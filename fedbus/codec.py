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

from dataclasses import dataclass
from typing import Any, Final

import msgspec

from fedbus.errors import ConfigError, DecodeError, EncodeError, IncompatibleVersion
from fedbus.messages import FORMAT_VERSION, AnyMessage, Message

__all__ = ["DEFAULT_LIMITS", "DecodeLimits", "decode", "encode", "peek_header"]


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
    if len(weights) > limits.max_tensors:
        raise DecodeError(f"{len(weights)} tensors exceed the limit of {limits.max_tensors}")
    total = sum(t.data.nbytes for t in weights.values())
    if total > limits.max_tensor_bytes:
        raise DecodeError(f"{total} tensor bytes exceed the limit of {limits.max_tensor_bytes}")

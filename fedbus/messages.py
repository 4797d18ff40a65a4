"""Wire schema: the typed messages fedbus nodes exchange.

Each message is a MessagePack map. Every kind shares the envelope fields
``kind, v, run, round, sender, id``; the rest is the kind's body. The classes
are `msgspec.Struct` types because msgspec decodes MessagePack ``bin`` into a
`memoryview` of the payload (no copy of tensor bytes) and validates the schema
in the same pass; see docs/wire-format.md for the byte-level specification.

Unknown fields of a known version are ignored on decode (minor additions stay
compatible); the major version is ``v``.
"""

from __future__ import annotations

import math
import os
import random
import secrets
from collections.abc import Collection, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from fedbus.errors import EncodeError

__all__ = [
    "ALL_SELECTED",
    "DTYPES",
    "FORMAT_VERSION",
    "MAX_NDIM",
    "Ack",
    "AnyMessage",
    "Chunk",
    "ChunkRequest",
    "Credit",
    "Heartbeat",
    "Join",
    "Leave",
    "Manifest",
    "Message",
    "ModelBroadcast",
    "ModelUpdate",
    "Tensor",
    "UpdateFailure",
    "compact_selection",
    "confirms_join",
    "extra_tensors",
    "extras_from_arrays",
    "is_selected",
    "new_message_id",
    "tensors_from_arrays",
    "tensors_to_arrays",
]

FORMAT_VERSION: Final = 1
"""Major wire-format version. A receiver refuses other majors with IncompatibleVersion."""

MAX_NDIM: Final = 8

# Tensor dtypes on the wire: names a C client can switch on, always little-endian.
DTYPES: Final[Mapping[str, np.dtype[Any]]] = {
    "bool": np.dtype("?"),
    "int8": np.dtype("<i1"),
    "uint8": np.dtype("<u1"),
    "int16": np.dtype("<i2"),
    "uint16": np.dtype("<u2"),
    "int32": np.dtype("<i4"),
    "uint32": np.dtype("<u4"),
    "int64": np.dtype("<i8"),
    "uint64": np.dtype("<u8"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}
_NAME_OF: Final = {
    dt.newbyteorder("=") if dt.byteorder != "|" else dt: n for n, dt in DTYPES.items()
}
_NATIVE_NAME: Final = {dt: n for n, dt in DTYPES.items() if dt.isnative}
"""Wire names of the dtypes a little-endian host's arrays can be sent as without a cast."""

# Schema-level bounds. msgspec checks container lengths from their headers, so
# a hostile payload cannot make the decoder build huge containers.
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Name = Annotated[str, msgspec.Meta(max_length=256)]
Scalar = bool | int | float | str
SmallMap = Annotated[dict[Name, Scalar], msgspec.Meta(max_length=1024)]


_ids = random.Random(secrets.randbits(128))
os.register_at_fork(after_in_child=lambda: _ids.seed(secrets.randbits(128)))


def new_message_id() -> str:
    """Return a fresh random message id (16 hex characters).

    Ids are for telling messages apart (duplicates, replies), not secrets:
    they travel in clear. A generator seeded from the OS once per process
    (and again in a forked child) instead of an OS call per id: under load an
    id from ``secrets`` cost about 15 us, and every message needs one.
    """
    return f"{_ids.getrandbits(64):016x}"


class Tensor(msgspec.Struct, frozen=True, gc=False):
    """A dense tensor: dtype name, shape and little-endian C-order bytes.

    Decoded tensors hold a memoryview of the received payload; `array` is a
    zero-copy, read-only numpy view of it. Whoever needs to write copies.
    """

    dtype: str
    shape: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=MAX_NDIM)]
    data: memoryview

    def __post_init__(self) -> None:
        dt = DTYPES.get(self.dtype)
        if dt is None:
            raise ValueError(f"unknown tensor dtype {self.dtype!r}")
        if not (isinstance(self.data, memoryview) and self.data.format == "B"):
            # A caller handed bytes, a bytearray or a typed buffer: keep one
            # byte view so that `.nbytes`, encoding and `array` agree.
            msgspec.structs.force_setattr(self, "data", _byte_view(self.data))
        expected = math.prod(self.shape) * dt.itemsize
        if self.data.nbytes != expected:
            raise ValueError(
                f"tensor of dtype {self.dtype} and shape {self.shape} needs {expected} bytes, "
                f"got {self.data.nbytes}"
            )

    @classmethod
    def from_array(cls, value: Any) -> Tensor:
        """Wrap an array-like without copying when it is already C-contiguous little-endian.

        Accepts numpy arrays, anything exposing ``__array__`` and torch tensors
        (through ``.detach().cpu().numpy()``) without importing torch.
        """
        if type(value) is np.ndarray and value.flags.c_contiguous and value.ndim and value.size:
            # The common case (a trainer's float32 weights), without the general
            # path's conversions: issue 3's 1,000 clients wrap two a round each.
            name = _NATIVE_NAME.get(value.dtype)
            if name is not None and value.ndim <= MAX_NDIM:
                return cls(dtype=name, shape=list(value.shape), data=value.data.cast("B"))
        arr = _as_ndarray(value)
        dt = arr.dtype
        key = dt.newbyteorder("=") if dt.byteorder not in ("|", "=") else dt
        name = _NAME_OF.get(key)
        if name is None:
            raise EncodeError(f"dtype {dt} cannot be sent; supported: {', '.join(DTYPES)}")
        if arr.ndim > MAX_NDIM:
            raise EncodeError(f"tensor has {arr.ndim} dimensions; at most {MAX_NDIM} are allowed")
        # np.asarray(order="C") keeps 0-d arrays 0-d (ascontiguousarray would not).
        arr = np.asarray(arr, dtype=DTYPES[name], order="C")
        return cls(dtype=name, shape=list(arr.shape), data=_byte_view(arr))

    @property
    def array(self) -> npt.NDArray[Any]:
        """A numpy view of the bytes (read-only when the payload is immutable)."""
        # One constructor call instead of frombuffer + reshape: half the cost,
        # paid for every tensor of every received update.
        return np.ndarray(self.shape, DTYPES[self.dtype], self.data)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> npt.NDArray[Any]:
        arr = self.array
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            return arr.astype(dtype)
        return arr.copy() if copy else arr


def _byte_view(data: Any) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError as exc:
        raise ValueError(f"tensor data must be bytes-like, not {type(data).__name__}") from exc
    if view.ndim == 1 and view.format == "B":
        return view
    if not view.c_contiguous:
        raise ValueError("tensor data must be a C-contiguous buffer")
    if view.ndim == 0 or view.nbytes == 0:
        # A 0-d or empty buffer cannot be cast; copy its (tiny) bytes instead.
        return memoryview(view.tobytes())
    return view.cast("B")


def _as_ndarray(value: Any) -> npt.NDArray[Any]:
    try:
        return _to_ndarray(value)
    except EncodeError:
        raise
    except (TypeError, ValueError, AttributeError, RuntimeError) as exc:
        # e.g. a ragged list, or a torch tensor whose dtype numpy lacks (bfloat16)
        raise EncodeError(f"cannot convert {type(value).__name__} to an array: {exc}") from exc


def _to_ndarray(value: Any) -> npt.NDArray[Any]:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, Tensor):
        return value.array
    detach = getattr(value, "detach", None)
    if callable(detach):  # torch.Tensor, without importing torch
        return np.asarray(detach().cpu().numpy())
    if hasattr(value, "__array__"):
        return np.asarray(value)
    if hasattr(value, "numpy"):
        return np.asarray(value.numpy())
    if isinstance(value, int | float | bool | list | tuple):
        return np.asarray(value)
    raise EncodeError(f"cannot encode {type(value).__name__} as a tensor")


def tensors_from_arrays(weights: Mapping[str, Any]) -> dict[str, Tensor]:
    """Convert named array-likes to wire tensors, keeping their order."""
    return {name: Tensor.from_array(value) for name, value in weights.items()}


def tensors_to_arrays(tensors: Mapping[str, Tensor]) -> dict[str, npt.NDArray[Any]]:
    """Zero-copy numpy views of named wire tensors, keeping their order."""
    return {name: t.array for name, t in tensors.items()}


def extras_from_arrays(
    extras: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, Tensor]] | msgspec.UnsetType:
    """Wire form of named tensor sets; no sets gives `msgspec.UNSET` (the field is left out)."""
    if not extras:
        return msgspec.UNSET
    return {name: tensors_from_arrays(arrays) for name, arrays in extras.items()}


def extra_tensors(message: ModelBroadcast | ModelUpdate) -> dict[str, dict[str, npt.NDArray[Any]]]:
    """A message's ``extras`` as numpy views ({} when the field is absent)."""
    extras = message.extras
    if isinstance(extras, msgspec.UnsetType):
        return {}
    return {name: tensors_to_arrays(tensors) for name, tensors in extras.items()}


Tensors = Annotated[dict[Name, Tensor], msgspec.Meta(max_length=65536)]
Extras = Annotated[dict[Name, Tensors], msgspec.Meta(max_length=16)]
"""Further named tensor sets (SCAFFOLD's control variates): set name -> tensor table."""
IdList = Annotated[list[Id], msgspec.Meta(max_length=1_000_000)]

ALL_SELECTED: Final = "*"
"""``selected: ["*"]`` (model, manifest): every node the sender counts as live.

Issue 3: with every node selected, the full list (1,000 ids, about 12 KB, five
times a small model) went out with every broadcast. ``*`` can never be a node
id (ids match ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}``). A node the sender does not
count as live may still read itself as selected; its answer is then rejected
(``unselected``). Only an explicit listing confirms a join (`confirms_join`).
"""


def is_selected(node_id: str, selected: Sequence[str]) -> bool:
    """Whether a model's or manifest's ``selected`` asks ``node_id`` to answer."""
    return node_id in selected or ALL_SELECTED in selected


def confirms_join(node_id: str, selected: Sequence[str]) -> bool:
    """Whether ``selected`` names ``node_id`` itself (``*`` is no answer to a Join)."""
    return node_id in selected


def compact_selection(selected: Sequence[str], live: Collection[str]) -> list[str]:
    """The wire's ``selected`` for a sender whose live nodes are ``live``.

    ``["*"]`` when ``selected`` is exactly every live node (and there is at
    least one), else the ids themselves.
    """
    if selected and len(selected) == len(live) and all(n in live for n in selected):
        return [ALL_SELECTED]
    return list(selected)


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Envelope fields shared by every message kind.

    Attributes:
        v: major wire-format version.
        run: the run id; receivers drop messages of other runs.
        round: the protocol round the message belongs to (0 before round 1).
        sender: node id of the publisher; must equal the node id in the topic.
        id: unique message id; receivers drop duplicates by it.
    """

    KIND: ClassVar[str] = ""

    v: int = FORMAT_VERSION
    run: Id
    round: Annotated[int, msgspec.Meta(ge=0)] = 0
    sender: Id
    id: Id = msgspec.field(default_factory=new_message_id)


class Join(Message, frozen=True, kw_only=True, tag="join"):
    """A node announces itself (role, how much data it holds, what it can do)."""

    KIND: ClassVar[str] = "join"
    role: Name = "client"
    num_examples: Annotated[int, msgspec.Meta(ge=0)] = 0
    capabilities: SmallMap = msgspec.field(default_factory=dict)


class Leave(Message, frozen=True, kw_only=True, tag="leave"):
    """A node leaves; also published by the broker as the node's last will."""

    KIND: ClassVar[str] = "leave"
    reason: Name = ""


class Heartbeat(Message, frozen=True, kw_only=True, tag="heartbeat"):
    """Liveness and coarse status of a node."""

    KIND: ClassVar[str] = "heartbeat"
    status: Name = "alive"
    metrics: SmallMap = msgspec.field(default_factory=dict)


class ModelBroadcast(Message, frozen=True, kw_only=True, tag="model"):
    """The (global) model sent down to nodes, with the round's training config.

    ``selected`` lists the nodes asked to answer this broadcast (train, or
    evaluate when ``config["task"] == "evaluate"``); the model is published
    once for all subscribers, and a node not listed only keeps it.
    ``encoding`` names how ``weights`` are to be read ("dense": the tensors are
    the model itself), leaving room for compressed or masked encodings.
    ``extras`` carries further named tensor sets, e.g. ``{"control": ...}``,
    SCAFFOLD's server control variate; absent from the encoding unless set
    (`msgspec.UNSET`), so messages without it keep their bytes. Read it
    through `extra_tensors`.
    """

    KIND: ClassVar[str] = "model"
    weights: Tensors
    encoding: Name = "dense"
    config: SmallMap = msgspec.field(default_factory=dict)
    selected: IdList = msgspec.field(default_factory=list)
    extras: Extras | msgspec.UnsetType = msgspec.UNSET


class ModelUpdate(Message, frozen=True, kw_only=True, tag="update"):
    """A node's result for a round: new weights or a delta, sample count, metrics.

    ``reply_to`` carries the id of the request (broadcast) it answers.
    ``encoding`` is "dense" (full weights) or "delta" (difference to the model
    received); later encodings (quantized, sparse, masked) get new names.
    ``extras`` carries further named tensor sets, e.g. ``{"control": ...}``,
    SCAFFOLD's control-variate delta; absent unless set, as on `ModelBroadcast`.
    """

    KIND: ClassVar[str] = "update"
    weights: Tensors
    num_examples: Annotated[int, msgspec.Meta(ge=0)] = 0
    encoding: Name = "dense"
    reply_to: Annotated[str, msgspec.Meta(max_length=128)] = ""
    metrics: SmallMap = msgspec.field(default_factory=dict)
    extras: Extras | msgspec.UnsetType = msgspec.UNSET


class UpdateFailure(Message, frozen=True, kw_only=True, tag="update_failed"):
    """A node could not produce its update for a round (failures are data, as in Flower).

    The aggregating node counts it and stops waiting for that node this round.
    """

    KIND: ClassVar[str] = "update_failed"
    reason: Name = ""
    reply_to: Annotated[str, msgspec.Meta(max_length=128)] = ""


class Manifest(Message, frozen=True, kw_only=True, tag="manifest"):
    """Where a run stands, published retained so late joiners catch up.

    The envelope's ``round`` is the round in progress; ``model_id`` is the id
    of its model broadcast; ``state`` is the aggregator's state name (e.g.
    "waiting_for_nodes", "collecting", "finished").
    """

    KIND: ClassVar[str] = "manifest"
    state: Name
    attempt: Annotated[int, msgspec.Meta(ge=0)] = 0
    completed_round: Annotated[int, msgspec.Meta(ge=0)] = 0
    rounds: Annotated[int, msgspec.Meta(ge=0)] = 0
    model_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    selected: IdList = msgspec.field(default_factory=list)


class Ack(Message, frozen=True, kw_only=True, tag="ack"):
    """Application-level acknowledgement of message ``ref`` (QoS 1 is not end to end)."""

    KIND: ClassVar[str] = "ack"
    ref: Id
    status: Literal["ok", "rejected"] = "ok"
    detail: Name = ""


class Chunk(Message, frozen=True, kw_only=True, tag="chunk"):
    """One piece of a payload larger than the broker's packet limit.

    The reassembled ``size`` bytes are themselves one encoded message.
    ``crc`` is the CRC-32 of this chunk's ``data``. ``digest`` is the SHA-256
    of the transfer's chunk table (docs/wire-format.md section 8): required in
    the last chunk (``index == count - 1``); any other chunk carries either
    the same 32 bytes or an empty bin.
    """

    KIND: ClassVar[str] = "chunk"
    xfer: Id
    index: Annotated[int, msgspec.Meta(ge=0)]
    count: Annotated[int, msgspec.Meta(ge=1)]
    size: Annotated[int, msgspec.Meta(ge=0)]
    digest: Annotated[bytes, msgspec.Meta(max_length=32)]  # 32 bytes, or empty (not last)
    crc: Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
    data: memoryview

    def __post_init__(self) -> None:
        if self.index >= self.count:
            raise ValueError(f"chunk index {self.index} is not below its count {self.count}")
        if len(self.digest) != 32 and (self.digest or self.index == self.count - 1):
            raise ValueError(
                f"chunk digest of {len(self.digest)} bytes: 32 required"
                + (" in the last chunk" if self.index == self.count - 1 else ", or empty")
            )


class ChunkRequest(Message, frozen=True, kw_only=True, tag="chunk_request"):
    """The receiver asks the sender of transfer ``xfer`` to send ``missing`` chunks again."""

    KIND: ClassVar[str] = "chunk_request"
    xfer: Id
    missing: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=65536)]


class Credit(Message, frozen=True, kw_only=True, tag="credit"):
    """Flow control: the sender of ``xfer`` may send chunks with index below ``upto``."""

    KIND: ClassVar[str] = "credit"
    xfer: Id
    upto: Annotated[int, msgspec.Meta(ge=0)]


AnyMessage = (
    Join
    | Leave
    | Heartbeat
    | ModelBroadcast
    | ModelUpdate
    | UpdateFailure
    | Manifest
    | Ack
    | Chunk
    | ChunkRequest
    | Credit
)
"""Every message kind of format version 1."""

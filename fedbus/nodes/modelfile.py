"""Model and checkpoint files: plain, deterministic MessagePack.

``model.msgpack`` is a MessagePack map ``name -> tensor``, each tensor the
wire format's ``{dtype, shape, data}`` map (docs/wire-format.md), with no run
id, message id or timestamp inside: the same weights always give the same
bytes, so ``model_sha256`` identifies a model across runs and machines.

A checkpoint is a map of a few scalars plus the weights and the aggregator
state in the same tensor form, written atomically (temp file, fsync,
``os.replace``) so an interrupted write leaves the previous checkpoint whole.

msgspec is imported here and in `fedbus.codec` only: these files are not
messages (no envelope), so the message codec does not cover them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from fedbus.errors import DecodeError
from fedbus.messages import Tensor, tensors_from_arrays, tensors_to_arrays

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "atomic_write",
    "decode_model",
    "encode_model",
    "read_checkpoint",
    "read_versioned",
    "sha256_hex",
    "write_checkpoint",
]

CHECKPOINT_FORMAT: Final = 1

_Tensors = dict[str, Tensor]


class _Versioned(Protocol):
    @property
    def format(self) -> int: ...


_V = TypeVar("_V", bound=_Versioned)


class _CheckpointFile(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    name: str
    run: str
    round: int
    seed: int
    elapsed_s: float
    bytes_total: int
    weights: _Tensors
    aggregator_state: _Tensors = msgspec.field(default_factory=dict)
    pending_row: str = ""
    topology: str = ""


_encoder: Final = msgspec.msgpack.Encoder()
_model_decoder: Final = msgspec.msgpack.Decoder(_Tensors)
_checkpoint_decoder: Final = msgspec.msgpack.Decoder(_CheckpointFile)


def encode_model(weights: Mapping[str, Any]) -> bytes:
    """The deterministic ``model.msgpack`` bytes of ``weights`` (names in model order)."""
    return _encoder.encode(tensors_from_arrays(weights))


def decode_model(data: bytes) -> dict[str, npt.NDArray[Any]]:
    """Read ``model.msgpack`` bytes back into named (read-only) arrays.

    Raises:
        DecodeError: not a model file.
    """
    try:
        return tensors_to_arrays(_model_decoder.decode(data))
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise DecodeError(f"not a fedbus model file: {exc}") from exc


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (``model_sha256`` in summary.json)."""
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_versioned(
    path: Path, decoder: msgspec.msgpack.Decoder[_V], *, kind: str, version: int
) -> _V | None:
    """The record in ``path`` decoded by ``decoder`` (None: no such file).

    The read shared by the per-node checkpoint files (`fedbus.nodes.edge_checkpoint`,
    `fedbus.nodes.peer_checkpoint`), where a missing file means "start fresh";
    ``kind`` names the file in the errors.

    Raises:
        DecodeError: not such a file, or its ``format`` is not ``version``.
    """
    try:
        record = decoder.decode(path.read_bytes())
    except FileNotFoundError:
        return None
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise DecodeError(f"{path}: not a fedbus {kind}: {exc}") from exc
    if record.format != version:
        raise DecodeError(f"{path}: {kind} format {record.format} is not supported")
    return record


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """What ``--resume`` needs to continue a run after ``round``.

    Attributes:
        name: the topology name.
        run: the run id, kept by the resumed run.
        round: the last completed round.
        seed: the run's seed.
        elapsed_s: run time spent up to the end of ``round``.
        bytes_total: bytes moved up to the end of ``round``.
        weights: the global model after ``round``.
        aggregator_state: the aggregator's state after ``round``.
        pending_row: a metrics row still waiting for its evaluation (federated), JSON.
        topology: the topology file's text.
    """

    name: str
    run: str
    round: int
    seed: int
    elapsed_s: float
    bytes_total: int
    weights: Mapping[str, npt.NDArray[Any]]
    aggregator_state: Mapping[str, npt.NDArray[Any]] = field(default_factory=dict)
    pending_row: str = ""
    topology: str = ""


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically."""
    record = _CheckpointFile(
        format=CHECKPOINT_FORMAT,
        name=checkpoint.name,
        run=checkpoint.run,
        round=checkpoint.round,
        seed=checkpoint.seed,
        elapsed_s=checkpoint.elapsed_s,
        bytes_total=checkpoint.bytes_total,
        weights=tensors_from_arrays(checkpoint.weights),
        aggregator_state=tensors_from_arrays(checkpoint.aggregator_state),
        pending_row=checkpoint.pending_row,
        topology=checkpoint.topology,
    )
    atomic_write(path, _encoder.encode(record))


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by `write_checkpoint`.

    Raises:
        DecodeError: not a checkpoint, or of another format version.
        OSError: the file cannot be read.
    """
    try:
        record = _checkpoint_decoder.decode(path.read_bytes())
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise DecodeError(f"{path}: not a fedbus checkpoint: {exc}") from exc
    if record.format != CHECKPOINT_FORMAT:
        raise DecodeError(f"{path}: checkpoint format {record.format} is not supported")
    return Checkpoint(
        name=record.name,
        run=record.run,
        round=record.round,
        seed=record.seed,
        elapsed_s=record.elapsed_s,
        bytes_total=record.bytes_total,
        weights={k: np.array(v) for k, v in tensors_to_arrays(record.weights).items()},
        aggregator_state={
            k: np.array(v) for k, v in tensors_to_arrays(record.aggregator_state).items()
        },
        pending_row=record.pending_row,
        topology=record.topology,
    )

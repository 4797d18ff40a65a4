"""Peer checkpoints: where a resumed gossip run restarts each peer from.

A gossip run has no global model to restart from: each peer holds its own.
So each time the launcher writes the row of round r (every peer still in
the run has reported r or moved past it), it also writes the model of each
peer that reported r to ``peers/<peer-id>.msgpack``, then the run's
``checkpoint.msgpack`` (`fedbus.nodes.modelfile`: the honest peers' average
after round r, the run id, the round). A resumed run restarts every peer from
its own file, at the round after the one in it: a peer that was away in
round r restarts from an earlier round and catches up as a returning peer
does (it jumps to its neighbours' round when their models arrive). Files
are written atomically, peers first, so a run interrupted between the two
has peer files at most one round ahead of the checkpoint, which is harmless.
Plain MessagePack as the other files; no pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from fedbus.messages import Tensor, tensors_from_arrays, tensors_to_arrays
from fedbus.nodes.modelfile import atomic_write, read_versioned

__all__ = ["PEERS_DIR", "PeerCheckpoint", "read_peer_checkpoint", "write_peer_checkpoint"]

PEERS_DIR: Final = "peers"
"""The folder of peer checkpoints inside a results folder."""

_FORMAT: Final = 1


class _File(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    peer: str
    run: str
    round: int
    weights: dict[str, Tensor]


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(_File)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerCheckpoint:
    """One peer's model after its completed round ``round``."""

    round: int
    weights: Mapping[str, npt.NDArray[Any]]


def write_peer_checkpoint(
    directory: Path, peer: str, *, run: str, checkpoint: PeerCheckpoint
) -> None:
    """Write ``peer``'s checkpoint to ``directory/<peer>.msgpack`` atomically."""
    record = _File(
        format=_FORMAT, peer=peer, run=run, round=checkpoint.round,
        weights=tensors_from_arrays(checkpoint.weights),
    )  # fmt: skip
    atomic_write(directory / f"{peer}.msgpack", _encoder.encode(record))


def read_peer_checkpoint(directory: Path, peer: str, *, run: str) -> PeerCheckpoint | None:
    """``peer``'s checkpoint of ``run`` (None: none there, or of another run: start fresh).

    Raises:
        DecodeError: the file is not a peer checkpoint, or of another format.
    """
    path = directory / f"{peer}.msgpack"
    record = read_versioned(path, _decoder, kind="peer checkpoint", version=_FORMAT)
    if record is None or record.run != run or record.peer != peer:
        return None
    weights = {k: np.array(v) for k, v in tensors_to_arrays(record.weights).items()}
    return PeerCheckpoint(round=record.round, weights=weights)

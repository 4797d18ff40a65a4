"""Write the golden wire-format vectors: one ``.msgpack`` file per case and ``vectors.json``.

Run from the repository root::

    .venv/bin/python tests/golden/make_golden.py [--check]

Everything is fixed (ids, arrays, transfer ids), so a run reproduces the files
byte for byte; ``tests/codec/test_golden.py`` fails if the codec's output ever
drifts from them. Firmware clients (``firmware_clients/``) test their encoders
and decoders against the same files.

``vectors.json`` describes each file as the plain MessagePack structure it
holds, with two markers for what JSON cannot say directly (docs/wire-format.md,
"Golden vectors"):

* ``{"$bin": "<hex>"}``: a MessagePack ``bin`` value;
* ``{"$tensor": {"dtype": ..., "shape": [...], "values": [...]}}``: a tensor
  map ``{"dtype", "shape", "data"}`` whose ``data`` is the little-endian,
  C-order bytes of ``values`` (flattened row-major; also given as ``data_hex``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np

from fedbus import codec
from fedbus.messages import (
    Ack,
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
)

HERE = Path(__file__).resolve().parent
RUN = "run-1"
SERVER = "server"
CLIENT = "client-0"


class Vector(NamedTuple):
    """One golden case: the file it lands in, what it means, and the message."""

    file: str
    description: str
    message: Message


def _t(values: Any, dtype: str) -> Tensor:
    return Tensor.from_array(np.array(values, dtype=dtype))


def _chunk_pair() -> tuple[Vector, Vector, Vector]:
    """A ModelUpdate too big for its (pretend) packet limit, and its two chunks."""
    inner = ModelUpdate(
        run=RUN,
        round=2,
        sender=CLIENT,
        id="00000000000000c0",
        weights={"w": _t(np.arange(48, dtype=np.float32) / 4, "float32")},
        num_examples=64,
        reply_to="0000000000000b02",
    )
    payload = codec.encode(inner)
    half = (len(payload) + 1) // 2
    pieces = [payload[:half], payload[half:]]
    # SHA-256 of the chunk table: size (8 bytes) then each chunk's CRC-32 (4 bytes), big-endian.
    table = len(payload).to_bytes(8, "big") + b"".join(
        zlib.crc32(p).to_bytes(4, "big") for p in pieces
    )
    digest = hashlib.sha256(table).digest()
    last = len(pieces) - 1
    chunks = tuple(
        Vector(
            file=f"chunk_{i}.msgpack",
            description=(
                f"chunk {i} of 2 of transfer xfer-1; the data of both chunks, "
                "concatenated, is chunked_payload.msgpack; "
                + (
                    "the last chunk carries the chunk-table digest"
                    if i == last
                    else "a chunk before the last may carry an empty digest"
                )
            ),
            message=Chunk(
                run=RUN,
                round=2,
                sender=CLIENT,
                id=f"00000000000000d{i}",
                xfer="xfer-1",
                index=i,
                count=len(pieces),
                size=len(payload),
                digest=digest if i == last else b"",
                crc=zlib.crc32(piece),
                data=memoryview(piece),
            ),
        )
        for i, piece in enumerate(pieces)
    )
    whole = Vector(
        file="chunked_payload.msgpack",
        description="the message that chunk_0 and chunk_1 carry, reassembled",
        message=inner,
    )
    return whole, chunks[0], chunks[1]


def build_vectors() -> list[Vector]:
    """Return every golden case, in file order."""
    whole, chunk0, chunk1 = _chunk_pair()
    return [
        Vector(
            "join.msgpack",
            "a client announces itself with its data size and capabilities",
            Join(
                run=RUN,
                sender=CLIENT,
                id="0000000000000001",
                role="client",
                num_examples=120,
                capabilities={"tflite": True, "max_payload_bytes": 131072, "dtype": "float32"},
            ),
        ),
        Vector(
            "leave.msgpack",
            "a client leaves (also its last will)",
            Leave(run=RUN, round=3, sender=CLIENT, id="0000000000000002", reason="shutdown"),
        ),
        Vector(
            "heartbeat.msgpack",
            "liveness with a few metrics of every scalar type",
            Heartbeat(
                run=RUN,
                round=1,
                sender=CLIENT,
                id="0000000000000003",
                status="training",
                metrics={"cpu": 0.25, "epoch": 1, "battery_low": False, "phase": "fit"},
            ),
        ),
        Vector(
            "model.msgpack",
            "the server broadcasts a two-tensor model and the round's training config",
            ModelBroadcast(
                run=RUN,
                round=1,
                sender=SERVER,
                id="0000000000000b01",
                weights={
                    "dense.weight": _t([[0.5, -0.25, 1.0], [2.0, -1.5, 0.125]], "float32"),
                    "dense.bias": _t([0.0, 1.0, -2.0], "float32"),
                },
                config={"epochs": 1, "lr": 0.05, "batch_size": 16},
                selected=[CLIENT, "client-1"],
            ),
        ),
        Vector(
            "model_all_selected.msgpack",
            'a model broadcast that selects every live node: selected is ["*"]',
            ModelBroadcast(
                run=RUN,
                round=2,
                sender=SERVER,
                id="0000000000000b0a",
                weights={"w": _t([0.25, -0.5], "float32")},
                config={"epochs": 1},
                selected=["*"],
            ),
        ),
        Vector(
            "update.msgpack",
            "a small update: one float32 tensor of two values (the worked example)",
            ModelUpdate(
                run="r1",
                round=1,
                sender="c0",
                id="m1",
                weights={"w": _t([1.5, -2.0], "float32")},
                num_examples=3,
                reply_to="m0",
                metrics={"loss": 0.5},
            ),
        ),
        Vector(
            "model_extras.msgpack",
            "a SCAFFOLD broadcast: the model plus the server control variate in extras",
            ModelBroadcast(
                run=RUN,
                round=2,
                sender=SERVER,
                id="0000000000000b02",
                weights={"w": _t([1.0, -0.5], "float32")},
                config={"epochs": 1, "lr": 0.1},
                selected=[CLIENT],
                extras={"control": {"w": _t([0.25, -0.125], "float32")}},
            ),
        ),
        Vector(
            "update_extras.msgpack",
            "a SCAFFOLD update: the model delta plus the control-variate delta in extras",
            ModelUpdate(
                run=RUN,
                round=2,
                sender=CLIENT,
                id="0000000000000c02",
                weights={"w": _t([0.5, 0.0], "float32")},
                num_examples=4,
                encoding="delta",
                reply_to="0000000000000b02",
                extras={"control": {"w": _t([-0.5, 1.0], "float32")}},
            ),
        ),
        Vector(
            "ack.msgpack",
            "the server acknowledges an update",
            Ack(run=RUN, round=1, sender=SERVER, id="0000000000000a01", ref="00000000000000c0"),
        ),
        Vector(
            "ack_rejected.msgpack",
            "the server rejects a stale update",
            Ack(
                run=RUN,
                round=2,
                sender=SERVER,
                id="0000000000000a02",
                ref="00000000000000c1",
                status="rejected",
                detail="stale round",
            ),
        ),
        Vector(
            "update_failed.msgpack",
            "a client reports that it could not train this round",
            UpdateFailure(
                run=RUN,
                round=1,
                sender=CLIENT,
                id="0000000000000d01",
                reason="out of memory",
                reply_to="0000000000000b01",
            ),
        ),
        Vector(
            "manifest.msgpack",
            "the retained manifest: round 2 is collecting updates from two clients",
            Manifest(
                run=RUN,
                round=2,
                sender=SERVER,
                id="0000000000000901",
                state="collecting",
                attempt=0,
                completed_round=1,
                rounds=30,
                model_id="0000000000000b02",
                selected=[CLIENT, "client-1"],
            ),
        ),
        whole,
        chunk0,
        chunk1,
        Vector(
            "chunk_request.msgpack",
            "the receiver asks for chunk 1 of transfer xfer-1 again",
            ChunkRequest(
                run=RUN, round=2, sender=SERVER, id="0000000000000e01", xfer="xfer-1", missing=[1]
            ),
        ),
        Vector(
            "credit.msgpack",
            "the receiver lets the sender of xfer-1 send chunks with index below 2",
            Credit(run=RUN, round=2, sender=SERVER, id="0000000000000f01", xfer="xfer-1", upto=2),
        ),
        Vector(
            "tensor_0d.msgpack",
            "0-d tensors: shape [] holds exactly one element",
            ModelUpdate(
                run=RUN,
                round=1,
                sender=CLIENT,
                id="0000000000000101",
                weights={"step": _t(7, "int64"), "scale": _t(0.5, "float64")},
            ),
        ),
        Vector(
            "tensor_empty.msgpack",
            "empty tensors: any zero dimension means zero data bytes",
            ModelUpdate(
                run=RUN,
                round=1,
                sender=CLIENT,
                id="0000000000000102",
                weights={"none": _t([], "float32"), "rows": _t(np.zeros((2, 0)), "int32")},
            ),
        ),
        Vector(
            "tensor_small_dtypes.msgpack",
            "float16, int8, uint8 and bool tensors, 2-d int8 in C order",
            ModelUpdate(
                run=RUN,
                round=1,
                sender=CLIENT,
                id="0000000000000103",
                weights={
                    "half": _t([1.0, -2.5, 65504.0], "float16"),
                    "q": _t([[-128, -1], [0, 127]], "int8"),
                    "u": _t([0, 255], "uint8"),
                    "mask": _t([True, False, True], "bool"),
                },
            ),
        ),
        Vector(
            "tensor_all_dtypes.msgpack",
            "one tensor per wire dtype, with extreme values, shape [2, 1]",
            ModelBroadcast(
                run=RUN,
                round=1,
                sender=SERVER,
                id="0000000000000104",
                weights={
                    "bool": _t([[True], [False]], "bool"),
                    "int8": _t([[-128], [127]], "int8"),
                    "uint8": _t([[0], [255]], "uint8"),
                    "int16": _t([[-32768], [32767]], "int16"),
                    "uint16": _t([[0], [65535]], "uint16"),
                    "int32": _t([[-(2**31)], [2**31 - 1]], "int32"),
                    "uint32": _t([[0], [2**32 - 1]], "uint32"),
                    "int64": _t([[-(2**63)], [2**63 - 1]], "int64"),
                    "uint64": _t([[0], [2**64 - 1]], "uint64"),
                    "float16": _t([[-0.5], [1024.0]], "float16"),
                    "float32": _t([[-1.0e-3], [3.0e38]], "float32"),
                    "float64": _t([[-(2.0**-1000)], [1.0e300]], "float64"),
                },
            ),
        ),
    ]


def _describe(value: Any) -> Any:
    """The plain (JSON) description of a field value, with $bin / $tensor markers."""
    if isinstance(value, Tensor):
        arr = value.array
        return {
            "$tensor": {
                "dtype": value.dtype,
                "shape": list(value.shape),
                "values": arr.reshape(-1).tolist(),
                "data_hex": bytes(value.data).hex(),
            }
        }
    if isinstance(value, bytes | memoryview):
        return {"$bin": bytes(value).hex()}
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_describe(v) for v in value]
    return value


def describe(message: Message) -> dict[str, Any]:
    """Describe a message as its plain map: ``kind`` first, then fields in schema order."""
    out: dict[str, Any] = {"kind": message.KIND}
    for field in msgspec.structs.fields(message):
        value = getattr(message, field.name)
        if value is not msgspec.UNSET:  # an unset field is absent from the encoding
            out[field.name] = _describe(value)
    return out


def render() -> dict[str, bytes]:
    """Every golden file name mapped to its exact bytes (vectors.json included)."""
    files: dict[str, bytes] = {}
    entries = []
    for vec in build_vectors():
        payload = codec.encode(vec.message)
        files[vec.file] = payload
        entries.append(
            {
                "file": vec.file,
                "kind": vec.message.KIND,
                "description": vec.description,
                "size": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
                "fields": describe(vec.message),
            }
        )
    doc = {
        "format_version": 1,
        "generator": "tests/golden/make_golden.py",
        "markers": {
            "$bin": "a MessagePack bin value, given as lowercase hex",
            "$tensor": (
                "a tensor map {dtype, shape, data}; data is the little-endian C-order "
                "bytes of values (row-major flattening), also given as data_hex"
            ),
        },
        "vectors": entries,
    }
    files["vectors.json"] = (json.dumps(doc, indent=2, ensure_ascii=True) + "\n").encode()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    parser.add_argument("--check", action="store_true", help="only compare with the files in --out")
    args = parser.parse_args(argv)
    stale = []
    for name, data in render().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(name)
        else:
            path.write_bytes(data)
    if stale:
        print("out of date:", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The golden vectors in tests/golden/ against the codec and against msgpack-python.

Each vector is checked three ways, each from its description in vectors.json
(not from the generator): the message built from the description encodes to
the file's bytes; the file decodes to the described values; msgpack-python
reads the file as exactly the described plain structure.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import zlib
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import numpy as np
import pytest

from fedbus import codec
from fedbus.messages import DTYPES, AnyMessage, Chunk, Message, Tensor

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
SPEC = json.loads((GOLDEN / "vectors.json").read_text())
VECTORS = SPEC["vectors"]
IDS = [v["file"] for v in VECTORS]
KIND_CLASS: dict[str, type[Message]] = {
    cls.KIND: cls  # type: ignore[misc]
    for cls in AnyMessage.__args__
}


def _tensor_bytes(desc: dict[str, Any]) -> bytes:
    arr = np.array(desc["values"], dtype=DTYPES[desc["dtype"]]).reshape(desc["shape"])
    return arr.astype(DTYPES[desc["dtype"]].newbyteorder("<")).tobytes(order="C")


def to_plain(value: Any) -> Any:
    """vectors.json description -> what msgpack.unpackb(raw=False) yields."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        if set(value) == {"$tensor"}:
            t = value["$tensor"]
            data = _tensor_bytes(t)
            assert data.hex() == t["data_hex"], "values and data_hex disagree"
            return {"dtype": t["dtype"], "shape": list(t["shape"]), "data": data}
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    return value


def to_field(value: Any) -> Any:
    """vectors.json description -> a constructor argument of a message class."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        if set(value) == {"$tensor"}:
            t = value["$tensor"]
            return Tensor(
                dtype=t["dtype"], shape=list(t["shape"]), data=memoryview(_tensor_bytes(t))
            )
        return {k: to_field(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_field(v) for v in value]
    return value


def assert_same(actual: Any, expected: Any, path: str = "$") -> None:
    """Equality that also tells int from float from bool and keeps map order."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), f"{path}: length"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def _file(vec: dict[str, Any]) -> bytes:
    return (GOLDEN / vec["file"]).read_bytes()


def test_every_kind_has_a_vector() -> None:
    assert {v["kind"] for v in VECTORS} == set(KIND_CLASS)


def test_files_match_the_generator() -> None:
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered = module.render()
    on_disk = {p.name for p in GOLDEN.iterdir() if p.suffix in (".msgpack", ".json")}
    assert set(rendered) == on_disk
    for name, data in rendered.items():
        assert (GOLDEN / name).read_bytes() == data, f"{name} is stale: run make_golden.py"


@pytest.mark.parametrize("vec", VECTORS, ids=IDS)
def test_file_size_and_digest(vec: dict[str, Any]) -> None:
    data = _file(vec)
    assert len(data) == vec["size"]
    assert hashlib.sha256(data).hexdigest() == vec["sha256"]


@pytest.mark.parametrize("vec", VECTORS, ids=IDS)
def test_encode_of_described_message_is_the_file(vec: dict[str, Any]) -> None:
    fields = dict(vec["fields"])
    cls = KIND_CLASS[fields.pop("kind")]
    message = cls(**{k: to_field(v) for k, v in fields.items()})
    assert codec.encode(message) == _file(vec)


@pytest.mark.parametrize("vec", VECTORS, ids=IDS)
def test_msgpack_python_reads_the_described_structure(vec: dict[str, Any]) -> None:
    plain = msgpack.unpackb(_file(vec), raw=False, strict_map_key=True)
    assert_same(plain, to_plain(vec["fields"]))


@pytest.mark.parametrize("vec", VECTORS, ids=IDS)
def test_decode_gives_the_described_values(vec: dict[str, Any]) -> None:
    payload = _file(vec)
    message = codec.decode(payload)
    fields = vec["fields"]
    assert type(message) is KIND_CLASS[fields["kind"]]
    # An unset optional field (msgspec.UNSET, e.g. ``extras``) is absent from the bytes.
    names = [
        f.name
        for f in msgspec.structs.fields(message)
        if getattr(message, f.name) is not msgspec.UNSET
    ]
    assert names == [k for k in fields if k != "kind"]
    for name in names:
        _check_value(getattr(message, name), fields[name], payload, name)


def _check_value(actual: Any, desc: Any, payload: bytes, path: str) -> None:
    if isinstance(desc, dict) and set(desc) == {"$tensor"}:
        t = desc["$tensor"]
        assert isinstance(actual, Tensor), path
        assert actual.dtype == t["dtype"]
        assert actual.shape == t["shape"]
        arr = actual.array
        assert arr.dtype == DTYPES[t["dtype"]]
        assert arr.shape == tuple(t["shape"])
        assert arr.reshape(-1).tolist() == t["values"]
        assert not arr.flags.writeable
        if arr.size:
            assert np.shares_memory(arr, np.frombuffer(payload, np.uint8)), path
    elif isinstance(desc, dict) and set(desc) == {"$bin"}:
        assert bytes(actual) == bytes.fromhex(desc["$bin"]), path
    elif isinstance(desc, dict):
        assert isinstance(actual, dict), path
        assert list(actual) == list(desc), path
        for key in desc:
            _check_value(actual[key], desc[key], payload, f"{path}.{key}")
    else:
        assert_same(actual, desc, path)


def test_chunks_reassemble_to_the_payload() -> None:
    by_file = {v["file"]: v for v in VECTORS}
    whole = _file(by_file["chunked_payload.msgpack"])
    chunks = [codec.decode(_file(by_file[f"chunk_{i}.msgpack"])) for i in range(2)]
    assert all(isinstance(c, Chunk) for c in chunks)
    parts = []
    # The digest covers the chunk table (docs/wire-format.md section 8), computed
    # here from the spec alone: size (8 bytes) then each CRC-32 (4 bytes), big-endian.
    table = len(whole).to_bytes(8, "big")
    for chunk in chunks:
        assert isinstance(chunk, Chunk)
        table += chunk.crc.to_bytes(4, "big")
    for i, chunk in enumerate(chunks):
        assert isinstance(chunk, Chunk)
        assert (chunk.index, chunk.count, chunk.size) == (i, 2, len(whole))
        # Only the last chunk must carry the digest; chunk_0 carries an empty bin.
        assert chunk.digest == (hashlib.sha256(table).digest() if i == 1 else b"")
        assert chunk.crc == zlib.crc32(chunk.data)
        parts.append(bytes(chunk.data))
    assert b"".join(parts) == whole
    assert codec.decode(b"".join(parts)) == codec.decode(whole)


def test_wire_format_doc_shows_a_golden_file() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "wire-format.md").read_text()
    flat = "".join(doc.split())
    assert _file(VECTORS[IDS.index("update.msgpack")]).hex() in flat

"""fedbus messages (docs/wire-format.md sections 3-6) for MicroPython.

A message is a dict of its fields: the envelope (kind, v, run, round, sender,
id) and the body. Tables (capabilities, metrics, config) and tensor tables
(weights) may be dicts or `fbmsgpack.OMap`s; decoding returns OMaps so the
wire order survives on ports whose dicts are unordered. A tensor is a dict
{dtype, shape, data}; ``data`` is bytes-like (little-endian elements), or an
``array('f')`` when encoding.

`encode` writes the canonical form (kind, envelope, body fields in the
spec's order, every field present, defaults filled in), so encoding what
`decode` returned reproduces a canonical payload byte for byte.
"""

import sys

import fbmsgpack as mp

VERSION = 1

# kind -> ((field, default), ...) in canonical order; None: required.
KINDS = {
    "join": (("role", "client"), ("num_examples", 0), ("capabilities", None)),
    "leave": (("reason", ""),),
    "heartbeat": (("status", "alive"), ("metrics", None)),
    "model": (("weights", None), ("encoding", "dense"), ("config", None), ("selected", None)),
    "update": (
        ("weights", None),
        ("num_examples", 0),
        ("encoding", "dense"),
        ("reply_to", ""),
        ("metrics", None),
    ),
    "update_failed": (("reason", ""), ("reply_to", "")),
    "manifest": (
        ("state", None),
        ("attempt", 0),
        ("completed_round", 0),
        ("rounds", 0),
        ("model_id", ""),
        ("selected", None),
    ),
    "ack": (("ref", None), ("status", "ok"), ("detail", "")),
    "chunk": (
        ("xfer", None),
        ("index", None),
        ("count", None),
        ("size", None),
        ("digest", None),
        ("crc", None),
        ("data", None),
    ),
    "chunk_request": (("xfer", None), ("missing", None)),
    "credit": (("xfer", None), ("upto", None)),
}
# Fields whose missing default is an empty container, and what is required.
_EMPTY = {"capabilities": "map", "metrics": "map", "config": "map", "selected": "list"}
_REQUIRED = {
    "model": ("weights",),
    "update": ("weights",),
    "manifest": ("state",),
    "ack": ("ref",),
    "chunk": ("xfer", "index", "count", "size", "digest", "crc", "data"),
    "chunk_request": ("xfer", "missing"),
    "credit": ("xfer", "upto"),
}
ITEMSIZE = {
    "bool": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "float16": 2,
    "float32": 4,
    "float64": 8,
}
_LITTLE = sys.byteorder == "little"


class WireError(ValueError):
    """A payload that is not a valid fedbus message."""


class VersionError(WireError):
    """A major version other than 1."""


def _items(table):
    return list(table) if isinstance(table, mp.OMap) else [(k, table[k]) for k in table]


def _f32_bytes(arr):
    if _LITTLE:
        return bytes(arr)
    import struct

    return b"".join(struct.pack("<f", v) for v in arr)


def _pack_weights(out, weights):
    items = _items(weights)
    mp.pack_map_header(out, len(items))
    for name, t in items:
        mp.pack_str(out, name)
        mp.pack_map_header(out, 3)
        mp.pack_str(out, "dtype")
        mp.pack_str(out, t["dtype"])
        mp.pack_str(out, "shape")
        mp.pack(out, list(t["shape"]))
        mp.pack_str(out, "data")
        data = t["data"]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = _f32_bytes(data)
        mp.pack_bin_header(out, len(data))
        out.extend(data)


def encode(msg):
    """Encode message dict ``msg`` canonically; returns bytes."""
    kind = msg["kind"]
    fields = KINDS[kind]
    out = bytearray()
    mp.pack_map_header(out, 6 + len(fields))
    for key, value in (
        ("kind", kind),
        ("v", msg.get("v", VERSION)),
        ("run", msg["run"]),
        ("round", msg.get("round", 0)),
        ("sender", msg["sender"]),
        ("id", msg["id"]),
    ):
        mp.pack_str(out, key)
        mp.pack(out, value)
    for key, default in fields:
        mp.pack_str(out, key)
        value = msg.get(key, default)
        if value is None:
            value = [] if _EMPTY.get(key) == "list" else {}
        if key == "weights":
            _pack_weights(out, value)
        else:
            mp.pack(out, value)
    return bytes(out)


def _str(v, lo, hi, what):
    if not isinstance(v, str) or not lo <= len(v) <= hi:
        raise WireError("bad " + what)
    return v


def _uint(v, what):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise WireError("bad " + what)
    return v


def _table(v, what):
    if not isinstance(v, mp.OMap) or len(v) > 1024:
        raise WireError("bad " + what)
    for k, x in v:
        if len(k) > 256 or not isinstance(x, (bool, int, float, str)):
            raise WireError("bad entry in " + what)
    return v


def _tensor(v):
    if not isinstance(v, mp.OMap):
        raise WireError("a tensor must be a map")
    dtype, shape, data = v.get("dtype"), v.get("shape"), v.get("data")
    if dtype not in ITEMSIZE or not isinstance(shape, list) or len(shape) > 8:
        raise WireError("bad tensor dtype or shape")
    n = ITEMSIZE[dtype]
    for s in shape:
        n *= _uint(s, "shape")
    if not isinstance(data, memoryview) or len(data) != n:
        raise WireError("tensor data does not match its shape")
    return {"dtype": dtype, "shape": shape, "data": data}


def _weights(v):
    if not isinstance(v, mp.OMap) or len(v) > 65536:
        raise WireError("bad weights")
    return mp.OMap((_str(k, 0, 256, "tensor name"), _tensor(t)) for k, t in v)


def _check(kind, key, v):
    """Validate (and normalise) one known body field."""
    if key in ("capabilities", "metrics", "config"):
        return _table(v, key)
    if key == "weights":
        return _weights(v)
    if key in ("num_examples", "attempt", "completed_round", "rounds", "index", "count", "size"):
        return _uint(v, key)
    if key in ("upto",):
        return _uint(v, key)
    if key == "crc":
        if _uint(v, key) > 0xFFFFFFFF:
            raise WireError("bad crc")
        return v
    if key == "digest":
        # 32 bytes, or empty in a chunk before the last (checked with the index below)
        if not isinstance(v, memoryview) or len(v) not in (0, 32):
            raise WireError("bad digest")
        return v
    if key == "data":
        if not isinstance(v, memoryview):
            raise WireError("bad data")
        return v
    if key == "selected":
        if not isinstance(v, list) or len(v) > 1000000:
            raise WireError("bad selected")
        for s in v:
            _str(s, 0, 128, "selected id")
        return v
    if key == "missing":
        if not isinstance(v, list) or len(v) > 65536:
            raise WireError("bad missing")
        for i in v:
            _uint(i, "missing index")
        return v
    if key in ("reply_to", "model_id"):
        return _str(v, 0, 128, key)
    if key in ("ref", "xfer"):
        return _str(v, 1, 128, key)
    if key == "status" and kind == "ack" and v not in ("ok", "rejected"):
        raise WireError("bad ack status")
    return _str(v, 0, 256, key)


def decode(payload):
    """Decode one payload into a message dict (defaults applied, unknown fields dropped).

    Raises:
        VersionError: another major version.
        WireError: anything else wrong, including an unknown kind.
    """
    try:
        top = mp.unpackb(payload)
    except mp.DecodeError as exc:
        raise WireError(str(exc)) from exc
    if not isinstance(top, mp.OMap):
        raise WireError("a message is a map")
    kind, v = top.get("kind"), top.get("v")
    if not isinstance(kind, str) or isinstance(v, bool) or not isinstance(v, int):
        raise WireError("no kind or v")
    if v != VERSION:
        raise VersionError("major version " + str(v))
    if kind not in KINDS:
        raise WireError("unknown kind " + kind)
    msg = {
        "kind": kind,
        "v": v,
        "run": _str(top.get("run"), 1, 128, "run"),
        "round": _uint(top.get("round", 0), "round"),
        "sender": _str(top.get("sender"), 1, 128, "sender"),
        "id": _str(top.get("id"), 1, 128, "id"),
    }
    known = dict(KINDS[kind])
    for key, value in top:
        if key in known:
            msg[key] = _check(kind, key, value)
    for key in _REQUIRED.get(kind, ()):
        if key not in msg:
            raise WireError("missing field " + key)
    for key, default in KINDS[kind]:
        if key not in msg:
            kind_of_empty = _EMPTY.get(key)
            msg[key] = [] if kind_of_empty == "list" else mp.OMap() if kind_of_empty else default
    if kind == "chunk" and not msg["index"] < msg["count"]:
        raise WireError("chunk index out of range")
    if kind == "chunk" and msg["index"] == msg["count"] - 1 and len(msg["digest"]) != 32:
        raise WireError("last chunk without a digest")
    return msg

"""The MessagePack subset of the fedbus wire format, for MicroPython (and CPython).

Families: map, array, str, bin, int, float32/64, bool; no nil, no extension
types (docs/wire-format.md section 2). Maps decode to `OMap`, a list of
(key, value) pairs that keeps the wire order (MicroPython dicts need not), with
`get` for lookups. Encoding takes dict, OMap, list/tuple, str, bytes,
bytearray, memoryview, int, float and bool, always in the shortest format.
"""

import struct

MAX_DEPTH = 16


class DecodeError(ValueError):
    """Not valid MessagePack of the subset (or nesting too deep)."""


class OMap(list):
    """An ordered map: a list of (key, value) pairs; `get` returns the last occurrence."""

    def get(self, key, default=None):
        """The value of ``key`` (the last one if repeated), or ``default``."""
        found = default
        for k, v in self:
            if k == key:
                found = v
        return found

    def keys(self):
        """The keys in wire order."""
        return [k for k, _ in self]


def _head(out, fix_base, fix_max, n, codes):
    if n <= fix_max:
        out.append(fix_base | n)
    elif codes[0] is not None and n <= 0xFF:
        out.append(codes[0])
        out.append(n)
    elif n <= 0xFFFF:
        out.append(codes[1])
        out.extend(struct.pack(">H", n))
    else:
        out.append(codes[2])
        out.extend(struct.pack(">I", n))


def pack_int(out, v):
    """Append int ``v`` in the shortest format."""
    if v >= 0:
        if v < 0x80:
            out.append(v)
        elif v <= 0xFF:
            out.append(0xCC)
            out.append(v)
        elif v <= 0xFFFF:
            out.append(0xCD)
            out.extend(struct.pack(">H", v))
        elif v <= 0xFFFFFFFF:
            out.append(0xCE)
            out.extend(struct.pack(">I", v))
        else:
            out.append(0xCF)
            out.extend(struct.pack(">Q", v))
    elif v >= -32:
        out.append(v & 0xFF)
    elif v >= -128:
        out.append(0xD0)
        out.extend(struct.pack(">b", v))
    elif v >= -32768:
        out.append(0xD1)
        out.extend(struct.pack(">h", v))
    elif v >= -2147483648:
        out.append(0xD2)
        out.extend(struct.pack(">i", v))
    else:
        out.append(0xD3)
        out.extend(struct.pack(">q", v))


def pack_str(out, s):
    """Append str ``s`` (UTF-8)."""
    b = s.encode("utf-8")
    _head(out, 0xA0, 31, len(b), (0xD9, 0xDA, 0xDB))
    out.extend(b)


def pack_bin_header(out, n):
    """Append the header of a bin value of ``n`` bytes."""
    if n <= 0xFF:
        out.append(0xC4)
        out.append(n)
    elif n <= 0xFFFF:
        out.append(0xC5)
        out.extend(struct.pack(">H", n))
    else:
        out.append(0xC6)
        out.extend(struct.pack(">I", n))


def pack_map_header(out, n):
    """Append the header of a map of ``n`` entries."""
    _head(out, 0x80, 15, n, (None, 0xDE, 0xDF))


def pack_array_header(out, n):
    """Append the header of an array of ``n`` elements."""
    _head(out, 0x90, 15, n, (None, 0xDC, 0xDD))


def pack(out, v):
    """Append any supported value to bytearray ``out``."""
    if v is True:
        out.append(0xC3)
    elif v is False:
        out.append(0xC2)
    elif isinstance(v, int):
        pack_int(out, v)
    elif isinstance(v, float):
        out.append(0xCB)
        out.extend(struct.pack(">d", v))
    elif isinstance(v, str):
        pack_str(out, v)
    elif isinstance(v, (bytes, bytearray, memoryview)):
        pack_bin_header(out, len(v))
        out.extend(v)
    elif isinstance(v, dict):
        pack_map_header(out, len(v))
        for k in v:
            pack_str(out, k)
            pack(out, v[k])
    elif isinstance(v, OMap):
        pack_map_header(out, len(v))
        for k, x in v:
            pack_str(out, k)
            pack(out, x)
    elif isinstance(v, (list, tuple)):
        pack_array_header(out, len(v))
        for x in v:
            pack(out, x)
    else:
        raise TypeError("cannot encode " + type(v).__name__)


def packb(v):
    """Encode ``v`` to bytes."""
    out = bytearray()
    pack(out, v)
    return bytes(out)


class Reader:
    """Decodes values from a buffer; bin values come back as memoryview slices (no copy)."""

    def __init__(self, buf, pos=0):
        self.buf = memoryview(buf)
        self.pos = pos

    def _take(self, n):
        if n < 0 or self.pos + n > len(self.buf):
            raise DecodeError("truncated")
        start = self.pos
        self.pos += n
        return self.buf[start : self.pos]

    def _u(self, fmt, n):
        return struct.unpack(fmt, self._take(n))[0]

    def value(self, depth=0):
        """Decode one value."""
        if depth > MAX_DEPTH:
            raise DecodeError("nesting too deep")
        b = self._take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if b <= 0x8F:
            return self._map(b & 0x0F, depth)
        if b <= 0x9F:
            return self._array(b & 0x0F, depth)
        if b <= 0xBF:
            return self._str(b & 0x1F)
        if b == 0xC2:
            return False
        if b == 0xC3:
            return True
        if b == 0xC4:
            return self._take(self._u(">B", 1))
        if b == 0xC5:
            return self._take(self._u(">H", 2))
        if b == 0xC6:
            return self._take(self._u(">I", 4))
        if b == 0xCA:
            return self._u(">f", 4)
        if b == 0xCB:
            return self._u(">d", 8)
        ints = {0xCC: (">B", 1), 0xCD: (">H", 2), 0xCE: (">I", 4), 0xCF: (">Q", 8)}
        ints.update({0xD0: (">b", 1), 0xD1: (">h", 2), 0xD2: (">i", 4), 0xD3: (">q", 8)})
        if b in ints:
            fmt, n = ints[b]
            return self._u(fmt, n)
        if b == 0xD9:
            return self._str(self._u(">B", 1))
        if b == 0xDA:
            return self._str(self._u(">H", 2))
        if b == 0xDB:
            return self._str(self._u(">I", 4))
        if b == 0xDC:
            return self._array(self._u(">H", 2), depth)
        if b == 0xDD:
            return self._array(self._u(">I", 4), depth)
        if b == 0xDE:
            return self._map(self._u(">H", 2), depth)
        if b == 0xDF:
            return self._map(self._u(">I", 4), depth)
        raise DecodeError(f"unsupported type byte 0x{b:02x} (nil or ext)")

    def _str(self, n):
        try:
            return str(bytes(self._take(n)), "utf-8")
        except UnicodeError as exc:
            raise DecodeError("bad UTF-8") from exc

    def _array(self, n, depth):
        if n > len(self.buf) - self.pos:
            raise DecodeError("array longer than the input")
        return [self.value(depth + 1) for _ in range(n)]

    def _map(self, n, depth):
        if 2 * n > len(self.buf) - self.pos:
            raise DecodeError("map longer than the input")
        out = OMap()
        for _ in range(n):
            k = self.value(depth + 1)
            if not isinstance(k, str):
                raise DecodeError("map key is not a str")
            out.append((k, self.value(depth + 1)))
        return out


def unpackb(buf):
    """Decode one whole value; trailing bytes are an error."""
    r = Reader(buf)
    v = r.value()
    if r.pos != len(r.buf):
        raise DecodeError("trailing bytes")
    return v

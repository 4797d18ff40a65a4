"""Chunked transfers (docs/wire-format.md section 8) for MicroPython.

The receiver takes the chunk-table digest from any chunk that carries one
(the last chunk always does; the others may carry an empty bin). The sender
computes every CRC up front and puts the digest in every chunk, which stays
valid.

CRC-32 comes from ``binascii.crc32`` where the port has it, else from the
small table-free implementation below (same polynomial as zlib). SHA-256
comes from ``hashlib`` (``uhashlib`` on older ports).
"""

import struct

try:
    import hashlib
except ImportError:  # older MicroPython ports
    import uhashlib as hashlib

try:
    from binascii import crc32 as _native_crc32
except ImportError:
    _native_crc32 = None


def crc32_pure(data, crc=0):
    """CRC-32 (reflected 0xEDB88320, init and final XOR 0xFFFFFFFF), as zlib.crc32."""
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def crc32(data):
    """CRC-32 of ``data`` as an unsigned int."""
    if _native_crc32 is not None:
        return _native_crc32(data) & 0xFFFFFFFF
    return crc32_pure(data)


def table_digest(size, crcs):
    """SHA-256 of the chunk table: size (8 bytes) and each CRC (4 bytes), big-endian."""
    h = hashlib.sha256(struct.pack(">Q", size))
    for c in crcs:
        h.update(struct.pack(">I", c))
    return h.digest()


def packet_overhead(topic):
    """Upper bound of a PUBLISH packet's bytes around its payload (fedbus's rule)."""
    return 1 + 4 + 2 + len(topic.encode("utf-8")) + 2 + 1


def max_chunk_data(max_payload_bytes, topic_len, envelope_len):
    """Chunk data bytes that fit: limit - packet overhead - envelope - bin growth - margin."""
    return max_payload_bytes - (1 + 4 + 2 + topic_len + 2 + 1) - envelope_len - 3 - 64


class Tx:
    """The sending side of one transfer: chunk 0, then what the credit allows."""

    def __init__(self, payload, chunk_len, xfer):
        self.payload = payload
        self.chunk_len = chunk_len
        self.xfer = xfer
        n = len(payload)
        self.count = max(1, (n + chunk_len - 1) // chunk_len)
        view = memoryview(payload)
        self.crcs = [crc32(view[i * chunk_len : (i + 1) * chunk_len]) for i in range(self.count)]
        self.digest = table_digest(n, self.crcs)
        self.next_index = 0
        self.upto = 1
        self.credited = False

    def body(self, index):
        """The body fields of chunk ``index``."""
        start = index * self.chunk_len
        return {
            "xfer": self.xfer,
            "index": index,
            "count": self.count,
            "size": len(self.payload),
            "digest": self.digest,
            "crc": self.crcs[index],
            "data": memoryview(self.payload)[start : start + self.chunk_len],
        }

    def on_credit(self, upto):
        """A credit arrived; credits never move backwards."""
        self.credited = True
        if upto > self.upto:
            self.upto = upto

    def take(self):
        """Indices that may be sent now (advances the send position)."""
        end = min(self.count, self.upto)
        out = list(range(self.next_index, end)) if end > self.next_index else []
        if out:
            self.next_index = end
        return out

    @property
    def done(self):
        """Every chunk was sent once."""
        return self.next_index >= self.count


def geometry(size, count, index, n):
    """The full chunk length implied by one chunk (fedbus.chunking), or None."""
    if index >= count:
        return None
    if count == 1:
        return (size or 1) if n == size else None
    if index < count - 1:
        length = n
    else:
        rest = size - n
        if rest <= 0 or rest % (count - 1):
            return None
        length = rest // (count - 1)
    if length < 1 or (size + length - 1) // length != count:
        return None
    return length


ACCEPTED, COMPLETED, DUPLICATE, CORRUPT, OVERSIZE, BUSY, DIGEST_MISMATCH = range(7)


class Rx:
    """Reassembly of one transfer at a time (newest round wins) into one buffer."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.active = False
        self.done_key = None
        self.key = None
        self.buf = None

    def feed(self, chunk, sender, now_ms):
        """Take one decoded chunk message; returns a status constant."""
        key = (sender, chunk["xfer"])
        if not self.active and key == self.done_key:
            return DUPLICATE
        data = chunk["data"]
        if crc32(data) != chunk["crc"]:
            return CORRUPT
        if self.active and key != self.key:
            if chunk["round"] < self.round:
                return BUSY
            if chunk["round"] == self.round and now_ms - self.last_progress < 60000:
                return BUSY
            self.active = False
        digest = bytes(chunk["digest"])  # 32 bytes; may be empty but in the last chunk
        if not self.active:
            length = geometry(chunk["size"], chunk["count"], chunk["index"], len(data))
            if length is None:
                return CORRUPT
            if chunk["size"] > self.max_bytes:
                return OVERSIZE
            self.active = True
            self.key = key
            self.round = chunk["round"]
            self.size = chunk["size"]
            self.count = chunk["count"]
            self.chunk_len = length
            self.digest = b""  # taken from the first chunk that carries it
            self.buf = bytearray(self.size)
            self.have = bytearray(self.count)
            self.crcs = [0] * self.count
            self.received = 0
            self.last_progress = self.last_request = now_ms
            self.requests = 0
        index = chunk["index"]
        if chunk["count"] != self.count or chunk["size"] != self.size:
            return CORRUPT
        if digest and self.digest and digest != self.digest:
            return CORRUPT
        start = index * self.chunk_len
        if len(data) != min(self.chunk_len, self.size - start):
            return CORRUPT
        if self.have[index]:
            return DUPLICATE
        if digest and not self.digest:
            self.digest = digest
        self.buf[start : start + len(data)] = data
        self.have[index] = 1
        self.crcs[index] = chunk["crc"]
        self.received += 1
        self.last_progress = now_ms
        self.requests = 0
        if self.received < self.count:
            return ACCEPTED
        self.active = False
        self.done_key = key
        if len(self.digest) != 32 or table_digest(self.size, self.crcs) != self.digest:
            return DIGEST_MISMATCH
        return COMPLETED

    def missing(self, limit=128):
        """Indices still missing, at most ``limit``."""
        if not self.active:
            return []
        out = []
        for i in range(self.count):
            if not self.have[i]:
                out.append(i)
                if len(out) >= limit:
                    break
        return out

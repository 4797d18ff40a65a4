/* fb_chunk: see fb_chunk.h. CRC-32 and SHA-256 written for fedbus from their specifications
 * (ISO-HDLC CRC-32; FIPS 180-4). */
#include "fb_chunk.h"

#include <string.h>

/* ---- CRC-32: a 16-entry (nibble) table, 64 bytes of flash ---------------- */

static const uint32_t CRC_NIBBLE[16] = {0x00000000u, 0x1db71064u, 0x3b6e20c8u, 0x26d930acu, 0x76dc4190u, 0x6b6b51f4u,
                                        0x4db26158u, 0x5005713cu, 0xedb88320u, 0xf00f9344u, 0xd6d6a3e8u, 0xcb61b38cu,
                                        0x9b64c2b0u, 0x86d3d2d4u, 0xa00ae278u, 0xbdbdf21cu};

uint32_t fb_crc32_update(uint32_t crc, const uint8_t *data, size_t n) {
    size_t i;
    crc = ~crc;
    for (i = 0; i < n; i++) {
        crc ^= data[i];
        crc = (crc >> 4) ^ CRC_NIBBLE[crc & 15];
        crc = (crc >> 4) ^ CRC_NIBBLE[crc & 15];
    }
    return ~crc;
}

uint32_t fb_crc32(const uint8_t *data, size_t n) { return fb_crc32_update(0, data, n); }

/* ---- SHA-256 ------------------------------------------------------------- */

static const uint32_t K[64] = {
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
    0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
    0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
    0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
    0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
    0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
    0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha_block(uint32_t h[8], const uint8_t *p) {
    uint32_t w[64], a, b, c, d, e, f, g, hh;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = ((uint32_t)p[4 * i] << 24) | ((uint32_t)p[4 * i + 1] << 16) | ((uint32_t)p[4 * i + 2] << 8) |
               p[4 * i + 3];
    for (i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0];
    b = h[1];
    c = h[2];
    d = h[3];
    e = h[4];
    f = h[5];
    g = h[6];
    hh = h[7];
    for (i = 0; i < 64; i++) {
        uint32_t t1 = hh + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        hh = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += hh;
}

void fb_sha256_init(fb_sha256 *s) {
    static const uint32_t IV[8] = {0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
                                   0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};
    memcpy(s->h, IV, sizeof IV);
    s->total = 0;
    s->used = 0;
}

void fb_sha256_update(fb_sha256 *s, const uint8_t *data, size_t n) {
    s->total += n;
    while (n) {
        size_t take = 64 - s->used;
        if (take > n) take = n;
        memcpy(s->block + s->used, data, take);
        s->used += (uint32_t)take;
        data += take;
        n -= take;
        if (s->used == 64) {
            sha_block(s->h, s->block);
            s->used = 0;
        }
    }
}

void fb_sha256_final(fb_sha256 *s, uint8_t out[32]) {
    uint64_t bits = s->total * 8;
    uint8_t pad = 0x80, zero = 0, len[8];
    int i;
    fb_sha256_update(s, &pad, 1);
    while (s->used != 56) fb_sha256_update(s, &zero, 1);
    for (i = 0; i < 8; i++) len[i] = (uint8_t)(bits >> (56 - 8 * i));
    fb_sha256_update(s, len, 8);
    for (i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(s->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)s->h[i];
    }
}

/* ---- the chunk table ------------------------------------------------------ */

static void be_put(uint8_t *p, uint64_t v, int bytes) {
    int i;
    for (i = 0; i < bytes; i++) p[i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
}

void fb_chunk_digest_of_payload(const uint8_t *payload, size_t size, size_t chunk_len, uint8_t out[32]) {
    fb_sha256 s;
    uint8_t tmp[8];
    size_t start = 0;
    fb_sha256_init(&s);
    be_put(tmp, size, 8);
    fb_sha256_update(&s, tmp, 8);
    do {
        size_t n = size - start < chunk_len ? size - start : chunk_len;
        be_put(tmp, fb_crc32(payload + start, n), 4);
        fb_sha256_update(&s, tmp, 4);
        start += n;
    } while (start < size);
    fb_sha256_final(&s, out);
}

size_t fb_packet_overhead(size_t topic_len) { return 1 + 4 + 2 + topic_len + 2 + 1; }

size_t fb_chunk_max_data(size_t max_payload_bytes, size_t topic_len, size_t run_len, size_t sender_len,
                         size_t xfer_len, uint64_t round) {
    /* the chunk's envelope with its widest integers and an empty bin, measured by encoding it */
    fb_msg m;
    uint8_t digest[32] = {0};
    size_t envelope = 0, used;
    char ids[3][129];
    memset(ids, 'x', sizeof ids);
    if (run_len > 128 || sender_len > 128 || xfer_len > 128) return 0;
    {
        fb_str run = {ids[0], (uint32_t)run_len}, sender = {ids[1], (uint32_t)sender_len},
               id = {ids[2], 16}, xfer = {ids[2], (uint32_t)xfer_len};
        fb_msg_init(&m, FB_KIND_CHUNK, run, round, sender, id);
        m.body.chunk.xfer = xfer;
        m.body.chunk.index = 0xfffffffeu;
        m.body.chunk.count = 0xffffffffu;
        m.body.chunk.size = (uint64_t)1 << 40;
        m.body.chunk.digest = digest;
        m.body.chunk.crc = 0xffffffffu;
        m.body.chunk.data = digest;
        m.body.chunk.data_len = 0;
        fb_wire_encode(&m, NULL, 0, &envelope);
    }
    used = fb_packet_overhead(topic_len) + envelope + 3 /* bin header growth */ + 64 /* margin */;
    return max_payload_bytes > used ? max_payload_bytes - used : 0;
}

/* ---- sending -------------------------------------------------------------- */

void fb_tx_init(fb_tx *tx, const uint8_t *payload, size_t size, size_t chunk_len, const char *xfer) {
    memset(tx, 0, sizeof *tx);
    tx->payload = payload;
    tx->size = size;
    tx->chunk_len = chunk_len;
    tx->count = size == 0 ? 1 : (uint32_t)((size + chunk_len - 1) / chunk_len);
    strncpy(tx->xfer, xfer, sizeof tx->xfer - 1);
    fb_chunk_digest_of_payload(payload, size, chunk_len, tx->digest);
    tx->upto = 1; /* chunk 0 goes unsolicited */
}

void fb_tx_chunk(const fb_tx *tx, uint32_t index, fb_msg *m) {
    size_t start = (size_t)index * tx->chunk_len;
    size_t n = start >= tx->size ? 0 : (tx->size - start < tx->chunk_len ? tx->size - start : tx->chunk_len);
    m->kind = FB_KIND_CHUNK;
    m->body.chunk.xfer = fb_s(tx->xfer);
    m->body.chunk.index = index;
    m->body.chunk.count = tx->count;
    m->body.chunk.size = tx->size;
    m->body.chunk.digest = tx->digest;
    m->body.chunk.data = tx->payload + start;
    m->body.chunk.data_len = (uint32_t)n;
    m->body.chunk.crc = fb_crc32(tx->payload + start, n);
}

void fb_tx_on_credit(fb_tx *tx, uint64_t upto) {
    tx->credited = 1;
    if (upto > tx->upto) tx->upto = upto; /* credits never move backwards */
}

int64_t fb_tx_next(fb_tx *tx) {
    if (tx->next_index >= tx->count || tx->next_index >= tx->upto) return -1;
    return (int64_t)tx->next_index++;
}

/* ---- receiving ------------------------------------------------------------ */

void fb_rx_init(fb_rx *rx, uint8_t *buf, size_t cap, uint8_t *bitmap, uint32_t max_chunks) {
    memset(rx, 0, sizeof *rx);
    rx->buf = buf;
    rx->cap = cap;
    rx->have = bitmap;
    rx->max_chunks = max_chunks;
}

void fb_rx_reset(fb_rx *rx) { rx->active = 0; }

static void copy_str(char *dst, size_t cap, fb_str s) {
    size_t n = s.n < cap - 1 ? s.n : cap - 1;
    memcpy(dst, s.p, n);
    dst[n] = 0;
}

static int has(const fb_rx *rx, uint32_t i) { return (rx->have[i >> 3] >> (i & 7)) & 1; }

/* The length of a full chunk implied by one chunk (fedbus.chunking._geometry), 0 if inconsistent. */
static size_t geometry(uint64_t size, uint64_t count, uint64_t index, uint32_t n) {
    uint64_t len;
    if (index >= count) return 0;
    if (count == 1) return n == size ? (size ? (size_t)size : 1) : 0;
    if (index < count - 1) {
        len = n;
    } else {
        uint64_t rest;
        if (size <= n) return 0;
        rest = size - n;
        if (rest % (count - 1)) return 0;
        len = rest / (count - 1);
    }
    if (len < 1 || (size + len - 1) / len != count) return 0;
    return (size_t)len;
}

fb_rx_status fb_rx_feed(fb_rx *rx, const fb_msg *m, fb_str sender, uint64_t now_ms) {
    uint64_t index = m->body.chunk.index;
    size_t start, expected;
    if (!rx->active && rx->done_xfer[0] && fb_str_eq(m->body.chunk.xfer, rx->done_xfer)) return FB_RX_DUPLICATE;
    if (fb_crc32(m->body.chunk.data, m->body.chunk.data_len) != m->body.chunk.crc) return FB_RX_CORRUPT;
    if (rx->active && !(fb_str_eq(m->body.chunk.xfer, rx->xfer) && fb_str_eq(sender, rx->sender))) {
        /* one transfer at a time: a newer round's transfer replaces an older one */
        if (m->round < rx->round) return FB_RX_BUSY;
        if (m->round == rx->round && now_ms - rx->last_progress_ms < 60000u) return FB_RX_BUSY;
        rx->active = 0;
    }
    if (!rx->active) {
        size_t len = geometry(m->body.chunk.size, m->body.chunk.count, index, m->body.chunk.data_len);
        if (!len) return FB_RX_CORRUPT;
        if (m->body.chunk.size > rx->cap || m->body.chunk.count > rx->max_chunks) return FB_RX_OVERSIZE;
        rx->active = 1;
        copy_str(rx->sender, sizeof rx->sender, sender);
        copy_str(rx->xfer, sizeof rx->xfer, m->body.chunk.xfer);
        rx->round = m->round;
        rx->size = m->body.chunk.size;
        rx->count = (uint32_t)m->body.chunk.count;
        rx->chunk_len = len;
        rx->has_digest = 0; /* taken below from the first chunk that carries it */
        rx->received = 0;
        rx->requests = 0;
        rx->last_progress_ms = rx->last_request_ms = now_ms;
        memset(rx->have, 0, (rx->count + 7) / 8);
    }
    if (m->body.chunk.count != rx->count || m->body.chunk.size != rx->size) return FB_RX_CORRUPT;
    /* two different digests in one transfer: the later chunk is corrupt */
    if (m->body.chunk.digest && rx->has_digest && memcmp(m->body.chunk.digest, rx->digest, 32) != 0)
        return FB_RX_CORRUPT;
    start = (size_t)index * rx->chunk_len;
    expected = rx->size - start < rx->chunk_len ? (size_t)(rx->size - start) : rx->chunk_len;
    if (m->body.chunk.data_len != expected) return FB_RX_CORRUPT;
    if (has(rx, (uint32_t)index)) return FB_RX_DUPLICATE;
    if (m->body.chunk.digest && !rx->has_digest) {
        memcpy(rx->digest, m->body.chunk.digest, 32);
        rx->has_digest = 1;
    }
    memcpy(rx->buf + start, m->body.chunk.data, expected);
    rx->have[index >> 3] |= (uint8_t)(1u << (index & 7));
    rx->received++;
    rx->last_progress_ms = now_ms;
    rx->requests = 0;
    if (rx->received < rx->count) return FB_RX_ACCEPTED;
    rx->active = 0;
    copy_str(rx->done_xfer, sizeof rx->done_xfer, m->body.chunk.xfer);
    {
        uint8_t digest[32];
        fb_chunk_digest_of_payload(rx->buf, (size_t)rx->size, rx->chunk_len, digest);
        if (!rx->has_digest || memcmp(digest, rx->digest, 32) != 0) return FB_RX_DIGEST_MISMATCH;
    }
    return FB_RX_COMPLETED;
}

uint32_t fb_rx_missing(const fb_rx *rx, uint64_t *out, uint32_t max) {
    uint32_t i, n = 0;
    if (!rx->active) return 0;
    for (i = 0; i < rx->count && n < max; i++)
        if (!has(rx, i)) out[n++] = i;
    return n;
}

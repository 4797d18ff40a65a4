/*
 * fb_chunk: chunked transfers (docs/wire-format.md section 8).
 *
 * - CRC-32 (IEEE 802.3, reflected 0xEDB88320, as zlib.crc32) and SHA-256,
 *   both written here, small and table-light for microcontrollers.
 * - fb_chunk_digest: SHA-256 of a transfer's chunk table (size as 8 bytes
 *   big-endian, then each chunk's CRC-32 as 4 bytes big-endian).
 * - fb_tx: the sending side of one transfer over a caller-owned payload.
 *   It keeps no per-chunk state: CRCs are recomputed when a chunk is built.
 * - fb_rx: the receiving side, one transfer at a time, into a caller-provided
 *   buffer and bitmap (no malloc). Chunks may come in any order and any
 *   number of times.
 */
#ifndef FB_CHUNK_H
#define FB_CHUNK_H

#include <stddef.h>
#include <stdint.h>

#include "fb_wire.h"

#ifdef __cplusplus
extern "C" {
#endif

uint32_t fb_crc32_update(uint32_t crc, const uint8_t *data, size_t n); /* start with 0 */
uint32_t fb_crc32(const uint8_t *data, size_t n);

typedef struct {
    uint32_t h[8];
    uint64_t total;
    uint8_t block[64];
    uint32_t used;
} fb_sha256;

void fb_sha256_init(fb_sha256 *s);
void fb_sha256_update(fb_sha256 *s, const uint8_t *data, size_t n);
void fb_sha256_final(fb_sha256 *s, uint8_t out[32]);

/* Digest of the chunk table of `payload` cut into pieces of `chunk_len` bytes. */
void fb_chunk_digest_of_payload(const uint8_t *payload, size_t size, size_t chunk_len, uint8_t out[32]);

/* Bytes of chunk data that fit one PUBLISH of max_payload_bytes on a topic of
 * topic_len bytes, with the envelope strings given (same rule as fedbus:
 * packet overhead, chunk envelope with its widest integers, 64-byte margin).
 * 0 when nothing fits. */
size_t fb_chunk_max_data(size_t max_payload_bytes, size_t topic_len, size_t run_len, size_t sender_len,
                         size_t xfer_len, uint64_t round);

/* Upper bound of a PUBLISH packet's bytes around a payload (fedbus's packet_overhead). */
size_t fb_packet_overhead(size_t topic_len);

/* ---- sending ---- */
typedef struct {
    const uint8_t *payload;
    size_t size;
    size_t chunk_len;
    uint32_t count;
    uint8_t digest[32];
    char xfer[33];
    uint32_t next_index; /* chunks below this were sent */
    uint64_t upto; /* highest credit received */
    int credited;
} fb_tx;

void fb_tx_init(fb_tx *tx, const uint8_t *payload, size_t size, size_t chunk_len, const char *xfer);
/* Fill `m` as chunk `index` (the caller sets the envelope: run, round, sender, id). */
void fb_tx_chunk(const fb_tx *tx, uint32_t index, fb_msg *m);
void fb_tx_on_credit(fb_tx *tx, uint64_t upto);
/* Next chunk the credit allows, or -1. Advances next_index. */
int64_t fb_tx_next(fb_tx *tx);

/* ---- receiving ---- */
typedef enum {
    FB_RX_ACCEPTED,
    FB_RX_COMPLETED,
    FB_RX_DUPLICATE,
    FB_RX_CORRUPT,
    FB_RX_OVERSIZE, /* size above the buffer, or count above the bitmap */
    FB_RX_BUSY, /* another transfer is active and newer */
    FB_RX_DIGEST_MISMATCH
} fb_rx_status;

typedef struct {
    uint8_t *buf;
    size_t cap;
    uint8_t *have; /* bitmap, (max_chunks + 7) / 8 bytes */
    uint32_t max_chunks;
    int active;
    char sender[129];
    char xfer[129];
    uint64_t round;
    uint64_t size;
    uint32_t count;
    size_t chunk_len;
    uint8_t digest[32]; /* valid once has_digest: from the first chunk carrying one */
    uint8_t has_digest;
    uint32_t received;
    uint64_t last_progress_ms;
    uint64_t last_request_ms;
    uint32_t requests;
    char done_xfer[129]; /* the last completed transfer: late chunks are duplicates */
} fb_rx;

void fb_rx_init(fb_rx *rx, uint8_t *buf, size_t cap, uint8_t *bitmap, uint32_t max_chunks);
/* Feed one decoded chunk from `sender`. On COMPLETED the payload is rx->buf[0 .. rx->size). */
fb_rx_status fb_rx_feed(fb_rx *rx, const fb_msg *chunk, fb_str sender, uint64_t now_ms);
/* Missing indices, at most max of them; returns how many. */
uint32_t fb_rx_missing(const fb_rx *rx, uint64_t *out, uint32_t max);
void fb_rx_reset(fb_rx *rx);

#ifdef __cplusplus
}
#endif
#endif

/* Unit tests of the fedbus firmware client components (run by ctest). */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fb_chunk.h"
#include "fb_msgpack.h"
#include "fb_proto.h"
#include "fb_train.h"
#include "fb_wire.h"

#ifndef FB_GOLDEN_DIR
#define FB_GOLDEN_DIR "tests/golden"
#endif

static int g_failures = 0, g_checks = 0;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        g_checks++;                                                                  \
        if (!(cond)) {                                                               \
            g_failures++;                                                            \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

static uint8_t *read_golden(const char *name, size_t *len) {
    char path[512];
    FILE *f;
    uint8_t *buf;
    long n;
    snprintf(path, sizeof path, "%s/%s", FB_GOLDEN_DIR, name);
    f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        g_failures++;
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t)n + 1);
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) n = 0;
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void hex(const uint8_t *p, size_t n, char *out) {
    size_t i;
    for (i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", p[i]);
}

/* ---- msgpack ---------------------------------------------------------------- */

static void test_msgpack_ints(void) {
    static const int64_t values[] = {0, 1, 127, 128, 255, 256, 65535, 65536, 4294967295LL, 4294967296LL,
                                     INT64_MAX, -1, -32, -33, -128, -129, -32768, -32769, -2147483647LL - 1,
                                     -2147483649LL, INT64_MIN};
    static const size_t sizes[] = {1, 1, 1, 2, 2, 3, 3, 5, 5, 9, 9, 1, 1, 2, 2, 3, 3, 5, 5, 9, 9};
    size_t k;
    for (k = 0; k < sizeof values / sizeof values[0]; k++) {
        uint8_t buf[16];
        fb_mp_writer w;
        fb_mp_reader r;
        int64_t i;
        uint64_t u;
        int big;
        fb_mp_writer_init(&w, buf, sizeof buf);
        fb_mp_write_int(&w, values[k]);
        CHECK(w.len == sizes[k]);
        fb_mp_reader_init(&r, buf, w.len);
        CHECK(fb_mp_read_int(&r, &i, &u, &big) && !big && i == values[k] && r.pos == w.len);
    }
    {
        uint8_t buf[16];
        fb_mp_writer w;
        fb_mp_reader r;
        int64_t i;
        uint64_t u;
        int big;
        fb_mp_writer_init(&w, buf, sizeof buf);
        fb_mp_write_uint(&w, UINT64_MAX);
        CHECK(w.len == 9 && buf[0] == 0xcf);
        fb_mp_reader_init(&r, buf, w.len);
        CHECK(fb_mp_peek(&r) == FB_MP_UINT);
        CHECK(fb_mp_read_int(&r, &i, &u, &big) && big && u == UINT64_MAX);
        /* a negative value is not a uint */
        fb_mp_writer_init(&w, buf, sizeof buf);
        fb_mp_write_int(&w, -5);
        fb_mp_reader_init(&r, buf, w.len);
        CHECK(!fb_mp_read_uint(&r, &u) && r.err);
    }
}

static void test_msgpack_containers(void) {
    static uint8_t buf[200000];
    static char text[70000];
    static const uint32_t lens[] = {0, 31, 32, 255, 256, 65535, 65536};
    static const size_t hdr[] = {1, 1, 2, 2, 3, 3, 5};
    size_t k;
    memset(text, 'a', sizeof text);
    for (k = 0; k < sizeof lens / sizeof lens[0]; k++) {
        fb_mp_writer w;
        fb_mp_reader r;
        const char *s;
        const uint8_t *p;
        uint32_t n;
        fb_mp_writer_init(&w, buf, sizeof buf);
        fb_mp_write_str(&w, text, lens[k]);
        CHECK(w.len == hdr[k] + lens[k]);
        fb_mp_write_bin(&w, text, lens[k]);
        fb_mp_reader_init(&r, buf, w.len);
        CHECK(fb_mp_read_str(&r, &s, &n) && n == lens[k] && s == (const char *)buf + hdr[k]);
        CHECK(fb_mp_read_bin(&r, &p, &n) && n == lens[k] && r.pos == w.len);
    }
    {
        fb_mp_writer w;
        fb_mp_reader r;
        uint32_t n, i;
        double d;
        int f32, b;
        fb_mp_writer_init(&w, buf, sizeof buf);
        fb_mp_write_map(&w, 2);
        fb_mp_write_cstr(&w, "a");
        fb_mp_write_array(&w, 17);
        for (i = 0; i < 17; i++) fb_mp_write_f32(&w, (float)i * 0.5f);
        fb_mp_write_cstr(&w, "b");
        fb_mp_write_map(&w, 2);
        fb_mp_write_cstr(&w, "x");
        fb_mp_write_f64(&w, -0.1);
        fb_mp_write_cstr(&w, "y");
        fb_mp_write_bool(&w, 1);
        CHECK(!w.overflow);
        fb_mp_reader_init(&r, buf, w.len);
        CHECK(fb_mp_read_map(&r, &n) && n == 2);
        CHECK(fb_mp_skip(&r)); /* key */
        CHECK(fb_mp_read_array(&r, &n) && n == 17 && buf[r.pos - 3] == 0xdc);
        for (i = 0; i < 17; i++) CHECK(fb_mp_read_float(&r, &d, &f32) && f32 && d == i * 0.5);
        CHECK(fb_mp_skip(&r));
        CHECK(fb_mp_read_map(&r, &n) && n == 2);
        CHECK(fb_mp_skip(&r) && fb_mp_read_float(&r, &d, &f32) && !f32 && d == -0.1);
        CHECK(fb_mp_skip(&r) && fb_mp_read_bool(&r, &b) && b);
        CHECK(r.pos == w.len && !r.err);
        /* skip of a whole nested value */
        fb_mp_reader_init(&r, buf, w.len);
        CHECK(fb_mp_skip(&r) && r.pos == w.len);
        /* truncation is an error, never a read past the end */
        fb_mp_reader_init(&r, buf, w.len - 1);
        CHECK(!fb_mp_skip(&r) && r.err);
    }
    {
        /* nil and ext are rejected by typed reads, skipped inside unknown fields */
        static const uint8_t nil[] = {0xc0};
        static const uint8_t ext[] = {0xd4, 0x01, 0x02};
        fb_mp_reader r;
        int64_t i;
        uint64_t u;
        int big;
        fb_mp_reader_init(&r, nil, 1);
        CHECK(fb_mp_peek(&r) == FB_MP_NIL && !fb_mp_read_int(&r, &i, &u, &big));
        fb_mp_reader_init(&r, nil, 1);
        CHECK(fb_mp_skip(&r) && r.pos == 1);
        fb_mp_reader_init(&r, ext, 3);
        CHECK(fb_mp_peek(&r) == FB_MP_EXT && fb_mp_skip(&r) && r.pos == 3);
    }
    {
        /* pathological nesting and lying lengths are refused */
        static uint8_t deep[64];
        static const uint8_t liar[] = {0xdd, 0xff, 0xff, 0xff, 0xff, 0x01};
        fb_mp_reader r;
        uint32_t n;
        memset(deep, 0x91, sizeof deep);
        fb_mp_reader_init(&r, deep, sizeof deep);
        CHECK(!fb_mp_skip(&r));
        fb_mp_reader_init(&r, liar, sizeof liar);
        CHECK(!fb_mp_read_array(&r, &n));
    }
    {
        /* the writer measures when the buffer is too small */
        fb_mp_writer w;
        uint8_t small[4];
        fb_mp_writer_init(&w, small, sizeof small);
        fb_mp_write_cstr(&w, "hello");
        CHECK(w.overflow && w.len == 6);
    }
}

/* ---- golden vectors ----------------------------------------------------------- */

static const char *const GOLDEN[] = {"join.msgpack",          "leave.msgpack",           "heartbeat.msgpack",
                                     "model.msgpack",         "update.msgpack",          "ack.msgpack",
                                     "ack_rejected.msgpack",  "update_failed.msgpack",   "manifest.msgpack",
                                     "chunked_payload.msgpack", "chunk_0.msgpack",       "chunk_1.msgpack",
                                     "chunk_request.msgpack", "credit.msgpack",          "tensor_0d.msgpack",
                                     "tensor_empty.msgpack",  "tensor_small_dtypes.msgpack", "tensor_all_dtypes.msgpack",
                                     "model_all_selected.msgpack"};

static fb_msg g_m, g_m2;

static void test_golden_roundtrip(void) {
    size_t k;
    for (k = 0; k < sizeof GOLDEN / sizeof GOLDEN[0]; k++) {
        size_t len, out_len = 0;
        uint8_t *buf = read_golden(GOLDEN[k], &len), *out;
        int rc;
        if (!buf) continue;
        rc = fb_wire_decode(&g_m, buf, len);
        CHECK(rc == FB_WIRE_OK);
        if (rc != FB_WIRE_OK) {
            fprintf(stderr, "  %s: decode %d\n", GOLDEN[k], rc);
            free(buf);
            continue;
        }
        out = malloc(len);
        rc = fb_wire_encode(&g_m, out, len, &out_len);
        CHECK(rc == FB_WIRE_OK && out_len == len && memcmp(out, buf, len) == 0);
        if (out_len != len || memcmp(out, buf, len) != 0) fprintf(stderr, "  %s: re-encoding differs\n", GOLDEN[k]);
        /* truncated input never decodes */
        CHECK(fb_wire_decode(&g_m2, buf, len - 1) != FB_WIRE_OK);
        free(out);
        free(buf);
    }
}

static void test_golden_fields(void) {
    size_t len;
    uint8_t *buf;
    const fb_tensor *t;
    double lr = 0;
    if ((buf = read_golden("model.msgpack", &len)) != NULL) {
        CHECK(fb_wire_decode(&g_m, buf, len) == FB_WIRE_OK);
        CHECK(g_m.kind == FB_KIND_MODEL && g_m.round == 1 && fb_str_eq(g_m.sender, "server"));
        t = fb_weights_get(&g_m.body.model.weights, "dense.weight");
        CHECK(t && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3 && t->nbytes == 24);
        CHECK(t && fb_get_f32le(t->data + 4) == -0.25f && fb_get_f32le(t->data + 20) == 0.125f);
        CHECK(fb_table_number(&g_m.body.model.config, "lr", &lr) && lr == 0.05);
        CHECK(g_m.body.model.selected.count == 2 && fb_list_contains(&g_m.body.model.selected, fb_s("client-1")));
        CHECK(!fb_list_contains(&g_m.body.model.selected, fb_s("client-2")));
        free(buf);
    }
    if ((buf = read_golden("model_all_selected.msgpack", &len)) != NULL) {
        CHECK(fb_wire_decode(&g_m, buf, len) == FB_WIRE_OK && g_m.kind == FB_KIND_MODEL && g_m.round == 2);
        CHECK(g_m.body.model.selected.count == 1 && fb_list_contains(&g_m.body.model.selected, fb_s("*")));
        free(buf);
    }
    if ((buf = read_golden("tensor_all_dtypes.msgpack", &len)) != NULL) {
        CHECK(fb_wire_decode(&g_m, buf, len) == FB_WIRE_OK && g_m.body.model.weights.count == 12);
        free(buf);
    }
    if ((buf = read_golden("ack_rejected.msgpack", &len)) != NULL) {
        CHECK(fb_wire_decode(&g_m, buf, len) == FB_WIRE_OK && fb_str_eq(g_m.body.ack.status, "rejected") &&
              fb_str_eq(g_m.body.ack.detail, "stale round"));
        free(buf);
    }
    if ((buf = read_golden("chunk_request.msgpack", &len)) != NULL) {
        fb_list_iter it;
        uint64_t v = 99;
        CHECK(fb_wire_decode(&g_m, buf, len) == FB_WIRE_OK);
        fb_list_begin(&it, &g_m.body.chunk_request.missing);
        CHECK(fb_list_next_uint(&it, &v) && v == 1 && !fb_list_next_uint(&it, &v));
        free(buf);
    }
}

/* The worked example (wire-format.md section 10), built from scratch. */
static void test_encode_update_from_scratch(void) {
    size_t len, out_len = 0;
    uint8_t *golden = read_golden("update.msgpack", &len), out[512];
    float w[2] = {1.5f, -2.0f};
    if (!golden) return;
    fb_msg_init(&g_m, FB_KIND_UPDATE, fb_s("r1"), 1, fb_s("c0"), fb_s("m1"));
    g_m.body.update.weights.count = 1;
    g_m.body.update.weights.items[0].name = fb_s("w");
    g_m.body.update.weights.items[0].dtype = fb_s("float32");
    g_m.body.update.weights.items[0].ndim = 1;
    g_m.body.update.weights.items[0].shape[0] = 2;
    g_m.body.update.weights.items[0].host_f32 = w;
    g_m.body.update.num_examples = 3;
    g_m.body.update.reply_to = fb_s("m0");
    fb_table_add_float(&g_m.body.update.metrics, "loss", 0.5);
    CHECK(fb_wire_encode(&g_m, out, sizeof out, &out_len) == FB_WIRE_OK);
    CHECK(out_len == len && memcmp(out, golden, len) == 0);
    free(golden);
}

static void test_decode_rejects(void) {
    uint8_t buf[256];
    fb_mp_writer w;
    /* v = 2: refused as a version error before the body is looked at */
    fb_mp_writer_init(&w, buf, sizeof buf);
    fb_mp_write_map(&w, 3);
    fb_mp_write_cstr(&w, "kind");
    fb_mp_write_cstr(&w, "credit");
    fb_mp_write_cstr(&w, "v");
    fb_mp_write_int(&w, 2);
    fb_mp_write_cstr(&w, "anything");
    fb_mp_write_int(&w, 0);
    CHECK(fb_wire_decode(&g_m, buf, w.len) == FB_WIRE_EVERSION);
    /* unknown kind */
    fb_mp_writer_init(&w, buf, sizeof buf);
    fb_mp_write_map(&w, 2);
    fb_mp_write_cstr(&w, "kind");
    fb_mp_write_cstr(&w, "teleport");
    fb_mp_write_cstr(&w, "v");
    fb_mp_write_int(&w, 1);
    CHECK(fb_wire_decode(&g_m, buf, w.len) == FB_WIRE_EKIND);
    /* a credit with an unknown field (ignored) and a nil in a known one (refused) */
    fb_mp_writer_init(&w, buf, sizeof buf);
    fb_mp_write_map(&w, 8);
    fb_mp_write_cstr(&w, "kind");
    fb_mp_write_cstr(&w, "credit");
    fb_mp_write_cstr(&w, "v");
    fb_mp_write_int(&w, 1);
    fb_mp_write_cstr(&w, "run");
    fb_mp_write_cstr(&w, "r");
    fb_mp_write_cstr(&w, "sender");
    fb_mp_write_cstr(&w, "s");
    fb_mp_write_cstr(&w, "id");
    fb_mp_write_cstr(&w, "i");
    fb_mp_write_cstr(&w, "future");
    fb_mp_write_array(&w, 1);
    {
        uint8_t nil = 0xc0;
        fb_mp_write_raw(&w, &nil, 1);
    }
    fb_mp_write_cstr(&w, "xfer");
    fb_mp_write_cstr(&w, "x");
    fb_mp_write_cstr(&w, "upto");
    fb_mp_write_uint(&w, 3);
    CHECK(fb_wire_decode(&g_m, buf, w.len) == FB_WIRE_OK && g_m.body.credit.upto == 3 && g_m.round == 0);
    buf[w.len - 1] = 0xc0; /* upto: nil */
    CHECK(fb_wire_decode(&g_m, buf, w.len) == FB_WIRE_EMALFORMED);
    /* trailing bytes */
    buf[w.len - 1] = 3;
    buf[w.len] = 0;
    CHECK(fb_wire_decode(&g_m, buf, w.len + 1) == FB_WIRE_EMALFORMED);
}

/* ---- CRC-32, SHA-256, chunks -------------------------------------------------- */

static void test_crc_sha(void) {
    static const struct {
        const char *in;
        const char *sha;
    } vec[] = {{"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
               {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
               {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"}};
    size_t k;
    uint8_t d[32];
    char h[65];
    fb_sha256 s;
    CHECK(fb_crc32((const uint8_t *)"123456789", 9) == 0xcbf43926u);
    CHECK(fb_crc32((const uint8_t *)"", 0) == 0);
    CHECK(fb_crc32_update(fb_crc32((const uint8_t *)"1234", 4), (const uint8_t *)"56789", 5) == 0xcbf43926u);
    for (k = 0; k < sizeof vec / sizeof vec[0]; k++) {
        fb_sha256_init(&s);
        fb_sha256_update(&s, (const uint8_t *)vec[k].in, strlen(vec[k].in));
        fb_sha256_final(&s, d);
        hex(d, 32, h);
        CHECK(strcmp(h, vec[k].sha) == 0);
    }
    {
        /* one million 'a', fed in odd pieces */
        static uint8_t a[1000];
        int i;
        memset(a, 'a', sizeof a);
        fb_sha256_init(&s);
        for (i = 0; i < 1000; i++) fb_sha256_update(&s, a, 1000);
        fb_sha256_final(&s, d);
        hex(d, 32, h);
        CHECK(strcmp(h, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0") == 0);
    }
}

static void test_golden_chunks(void) {
    size_t l0, l1, lp;
    uint8_t *c0 = read_golden("chunk_0.msgpack", &l0), *c1 = read_golden("chunk_1.msgpack", &l1);
    uint8_t *payload = read_golden("chunked_payload.msgpack", &lp);
    static uint8_t buf[1024], bitmap[8];
    fb_rx rx;
    uint8_t digest[32];
    if (!c0 || !c1 || !payload) return;
    /* digest and CRCs: chunk 0 carries an empty digest, the last chunk the digest */
    CHECK(fb_wire_decode(&g_m, c0, l0) == FB_WIRE_OK);
    CHECK(fb_crc32(g_m.body.chunk.data, g_m.body.chunk.data_len) == g_m.body.chunk.crc);
    CHECK(g_m.body.chunk.digest == NULL);
    fb_chunk_digest_of_payload(payload, lp, g_m.body.chunk.data_len, digest);
    CHECK(fb_wire_decode(&g_m, c1, l1) == FB_WIRE_OK);
    CHECK(g_m.body.chunk.digest != NULL && memcmp(digest, g_m.body.chunk.digest, 32) == 0);
    /* in order: the digest arrives with the last chunk */
    fb_rx_init(&rx, buf, sizeof buf, bitmap, 64);
    CHECK(fb_wire_decode(&g_m, c0, l0) == FB_WIRE_OK);
    CHECK(fb_rx_feed(&rx, &g_m, fb_s("client-0"), 0) == FB_RX_ACCEPTED);
    CHECK(fb_wire_decode(&g_m, c1, l1) == FB_WIRE_OK);
    CHECK(fb_rx_feed(&rx, &g_m, fb_s("client-0"), 1) == FB_RX_COMPLETED);
    CHECK(rx.size == lp && memcmp(buf, payload, lp) == 0);
    /* a non-last chunk carrying a different digest is corrupt */
    fb_rx_init(&rx, buf, sizeof buf, bitmap, 64);
    CHECK(fb_wire_decode(&g_m, c1, l1) == FB_WIRE_OK);
    CHECK(fb_rx_feed(&rx, &g_m, fb_s("client-0"), 0) == FB_RX_ACCEPTED);
    CHECK(fb_wire_decode(&g_m, c0, l0) == FB_WIRE_OK);
    {
        uint8_t other[32];
        memset(other, 7, sizeof other);
        g_m.body.chunk.digest = other;
        CHECK(fb_rx_feed(&rx, &g_m, fb_s("client-0"), 1) == FB_RX_CORRUPT);
        /* the same digest in a non-last chunk stays valid */
        g_m.body.chunk.digest = digest;
        CHECK(fb_rx_feed(&rx, &g_m, fb_s("client-0"), 2) == FB_RX_COMPLETED);
    }
    /* a last chunk without a digest does not decode */
    {
        uint8_t *enc = malloc(l1 + 64);
        size_t n = 0;
        CHECK(enc != NULL);
        CHECK(fb_wire_decode(&g_m, c1, l1) == FB_WIRE_OK);
        g_m.body.chunk.digest = NULL;
        CHECK(fb_wire_encode(&g_m, enc, l1 + 64, &n) == FB_WIRE_OK);
        CHECK(fb_wire_decode(&g_m, enc, n) == FB_WIRE_EMALFORMED);
        free(enc);
    }
    /* reassembly out of order, with duplicates */
    fb_rx_init(&rx, buf, sizeof buf, bitmap, 64);
    CHECK(fb_wire_decode(&g_m, c1, l1) == FB_WIRE_OK);
    CHECK(fb_rx_feed(&rx, &g_m, fb_s("client-0"), 0) == FB_RX_ACCEPTED);
    CHECK(fb_rx_feed(&rx, &g_m, fb_s("client-0"), 1) == FB_RX_DUPLICATE);
    {
        uint64_t missing[4];
        CHECK(fb_rx_missing(&rx, missing, 4) == 1 && missing[0] == 0);
    }
    CHECK(fb_wire_decode(&g_m, c0, l0) == FB_WIRE_OK);
    CHECK(fb_rx_feed(&rx, &g_m, fb_s("client-0"), 2) == FB_RX_COMPLETED);
    CHECK(rx.size == lp && memcmp(buf, payload, lp) == 0);
    CHECK(fb_rx_feed(&rx, &g_m, fb_s("client-0"), 3) == FB_RX_DUPLICATE);
    /* a corrupt chunk (flipped data byte) is refused */
    fb_rx_init(&rx, buf, sizeof buf, bitmap, 64);
    CHECK(fb_wire_decode(&g_m, c0, l0) == FB_WIRE_OK);
    ((uint8_t *)g_m.body.chunk.data)[3] ^= 1;
    CHECK(fb_rx_feed(&rx, &g_m, fb_s("client-0"), 0) == FB_RX_CORRUPT);
    /* a transfer larger than the buffer is refused */
    fb_rx_init(&rx, buf, 100, bitmap, 64);
    CHECK(fb_wire_decode(&g_m, c1, l1) == FB_WIRE_OK);
    CHECK(fb_rx_feed(&rx, &g_m, fb_s("client-0"), 0) == FB_RX_OVERSIZE);
    free(c0);
    free(c1);
    free(payload);
}

static uint32_t lcg(uint32_t *s) {
    *s = *s * 1664525u + 1013904223u;
    return *s >> 8;
}

static void test_tx_rx(void) {
    static uint8_t payload[10007], buf[10007], bitmap[64], enc[4096];
    static uint32_t sizes[] = {0, 1, 99, 100, 101, 1000, 10007};
    uint32_t seed = 42;
    size_t k, i;
    for (i = 0; i < sizeof payload; i++) payload[i] = (uint8_t)lcg(&seed);
    for (k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        fb_tx tx;
        fb_rx rx;
        uint32_t order[200], n, a, done = 0, completed = 0;
        int64_t idx;
        fb_tx_init(&tx, payload, sizes[k], 100, "x1");
        n = tx.count;
        CHECK(n == (sizes[k] ? (sizes[k] + 99) / 100 : 1));
        /* credit: chunk 0 alone, then what the credit allows */
        CHECK(fb_tx_next(&tx) == 0 && fb_tx_next(&tx) == -1);
        fb_tx_on_credit(&tx, 3);
        fb_tx_on_credit(&tx, 2); /* never backwards */
        while ((idx = fb_tx_next(&tx)) >= 0) done++;
        CHECK(done == (n < 3 ? n - 1 : 2));
        /* deliver every chunk in a shuffled order, each twice, through encode/decode */
        for (a = 0; a < n; a++) order[a] = a;
        for (a = n; a > 1; a--) {
            uint32_t b = lcg(&seed) % a, t = order[a - 1];
            order[a - 1] = order[b];
            order[b] = t;
        }
        fb_rx_init(&rx, buf, sizeof buf, bitmap, 512);
        for (a = 0; a < 2 * n; a++) {
            size_t len;
            fb_rx_status st;
            fb_msg_init(&g_m, FB_KIND_CHUNK, fb_s("ns"), 1, fb_s("c"), fb_s("id"));
            fb_tx_chunk(&tx, order[a % n], &g_m);
            CHECK(fb_wire_encode(&g_m, enc, sizeof enc, &len) == FB_WIRE_OK);
            CHECK(fb_wire_decode(&g_m2, enc, len) == FB_WIRE_OK);
            st = fb_rx_feed(&rx, &g_m2, fb_s("c"), a);
            if (st == FB_RX_COMPLETED) completed++;
            CHECK(a < n ? (st == FB_RX_ACCEPTED || st == FB_RX_COMPLETED) : st == FB_RX_DUPLICATE);
        }
        CHECK(completed == 1 && rx.size == sizes[k] && memcmp(buf, payload, sizes[k]) == 0);
    }
    /* the chunk size rule leaves room for the packet and the envelope */
    {
        size_t room = fb_chunk_max_data(4096, 60, 10, 10, 16, 3);
        CHECK(room > 3500 && room < 4096 - 60 - 100);
        CHECK(fb_chunk_max_data(200, 60, 10, 10, 16, 3) == 0);
    }
}

/* ---- trainer --------------------------------------------------------------------- */

static void test_trainer(void) {
    /* expected values from fedbus's NumpyTrainer.fit (batch_size = 4 = all samples) */
    static const float x[12] = {0.5f, -1.0f, 2.0f, 1.5f, 0.25f, -0.5f, 0.0f, 1.0f, 1.0f, -1.0f, 0.5f, 0.75f};
    static const uint8_t y[4] = {0, 1, 2, 1};
    static const float w0[9] = {0.1f, -0.2f, 0.3f, 0.0f, 0.4f, -0.1f, -0.3f, 0.2f, 0.05f};
    static const float b0[3] = {0.01f, -0.02f, 0.03f};
    static const float want_w[9] = {0.114707634f,  -0.0689451694f, 0.154237524f,  -0.288228869f, 0.454247683f,
                                    0.133981198f,  0.00973556936f, -0.0680275112f, 0.00829195045f};
    static const float want_b[3] = {-0.0125009082f, 0.0996511132f, -0.067150183f};
    static const float want_w_mu[9] = {0.114824116f,  -0.0661939606f, 0.15136987f,   -0.309868932f, 0.457566857f,
                                       0.152302086f,  0.00919680297f, -0.0819872394f, 0.022790432f};
    static const float want_b_mu[3] = {-0.0349095687f, 0.123393714f, -0.0684841275f};
    float w[9], b[3], gw[9], gb[3], scratch[3];
    uint8_t anchor_w[36], anchor_b[12];
    fb_dataset d = {4, 3, x, y};
    fb_logreg m = {3, 3, w, b};
    fb_fit_config cfg;
    double loss = 0, acc = 0;
    int i;
    memcpy(w, w0, sizeof w);
    memcpy(b, b0, sizeof b);
    memset(&cfg, 0, sizeof cfg);
    cfg.epochs = 2;
    cfg.lr = 0.5f;
    CHECK(fb_train_fit(&m, &d, &cfg, gw, gb, scratch, &loss) == 0);
    for (i = 0; i < 9; i++) CHECK(fabsf(w[i] - want_w[i]) < 1e-6f);
    for (i = 0; i < 3; i++) CHECK(fabsf(b[i] - want_b[i]) < 1e-6f);
    CHECK(fabs(loss - 1.0782029628753662) < 1e-6);
    /* FedProx: three steps with mu = 0.5 pull towards the round's weights */
    memcpy(w, w0, sizeof w);
    memcpy(b, b0, sizeof b);
    for (i = 0; i < 9; i++) fb_put_f32le(anchor_w + 4 * i, w0[i]);
    for (i = 0; i < 3; i++) fb_put_f32le(anchor_b + 4 * i, b0[i]);
    cfg.epochs = 3;
    cfg.mu = 0.5f;
    cfg.anchor_w_le = anchor_w;
    cfg.anchor_b_le = anchor_b;
    CHECK(fb_train_fit(&m, &d, &cfg, gw, gb, scratch, &loss) == 0);
    for (i = 0; i < 9; i++) CHECK(fabsf(w[i] - want_w_mu[i]) < 1e-6f);
    for (i = 0; i < 3; i++) CHECK(fabsf(b[i] - want_b_mu[i]) < 1e-6f);
    fb_train_evaluate(&m, &d, scratch, &loss, &acc);
    CHECK(loss > 0 && acc >= 0 && acc <= 1);
    /* labels out of range are refused */
    {
        static const uint8_t bad_y[4] = {0, 1, 3, 1};
        fb_dataset bad = {4, 3, x, bad_y};
        CHECK(fb_train_fit(&m, &bad, &cfg, gw, gb, scratch, &loss) == -1);
    }
}

/* ---- protocol: a client against a scripted server ------------------------------- */

#define MAX_SENT 64
static struct {
    char topic[FB_TOPIC_MAX];
    uint8_t payload[1100];
    size_t len;
} g_sent[MAX_SENT];
static int g_nsent = 0;

static int capture(void *ctx, const char *topic, const uint8_t *payload, size_t len, int retain) {
    (void)ctx;
    (void)retain;
    if (g_nsent >= MAX_SENT || len > sizeof g_sent[0].payload) return -1;
    strcpy(g_sent[g_nsent].topic, topic);
    memcpy(g_sent[g_nsent].payload, payload, len);
    g_sent[g_nsent].len = len;
    g_nsent++;
    return 0;
}

static fb_proto g_p;

static void feed(const char *topic, const fb_msg *m, uint64_t now) {
    static uint8_t buf[8192];
    size_t len;
    CHECK(fb_wire_encode(m, buf, sizeof buf, &len) == FB_WIRE_OK);
    fb_proto_on_message(&g_p, topic, buf, len, now);
}

static void test_proto(void) {
    static uint8_t rx_buf[8192], bitmap[64], tx_buf[8192], msg_buf[1024], model_buf[8192], list_buf[64];
    static float weights[64], work[64];
    static const float x[8] = {0.0f, 1.0f, 1.0f, 0.0f, 0.5f, 0.5f, 1.0f, 1.0f};
    static const uint8_t y[4] = {0, 1, 0, 1};
    static float w[2 * 2 * 100];
    fb_dataset data = {4, 2, x, y};
    fb_proto_config cfg;
    fb_str sel[2];
    size_t model_len;
    int i, chunk_msgs = 0;
    memset(&cfg, 0, sizeof cfg);
    cfg.node_id = "fw-1";
    cfg.namespace_ = "demo";
    cfg.max_payload_bytes = 1024;
    cfg.rx_buf = rx_buf;
    cfg.rx_cap = sizeof rx_buf;
    cfg.rx_bitmap = bitmap;
    cfg.rx_max_chunks = 512;
    cfg.tx_buf = tx_buf;
    cfg.tx_cap = sizeof tx_buf;
    cfg.msg_buf = msg_buf;
    cfg.msg_cap = sizeof msg_buf;
    cfg.weights = weights;
    cfg.weights_cap = 64;
    cfg.work = work;
    cfg.work_cap = 64;
    cfg.data = &data;
    cfg.publish = capture;
    CHECK(fb_proto_init(&g_p, &cfg) == 0);
    /* the retained manifest: the client joins */
    fb_msg_init(&g_m, FB_KIND_MANIFEST, fb_s("demo-1"), 0, fb_s("server"), fb_s("m0"));
    g_m.body.manifest.state = fb_s("waiting_for_nodes");
    feed("fedbus/demo/out/server/manifest", &g_m, 1000);
    CHECK(g_nsent == 1 && strcmp(g_sent[0].topic, "fedbus/demo/to/server/fw-1") == 0);
    CHECK(fb_wire_decode(&g_m2, g_sent[0].payload, g_sent[0].len) == FB_WIRE_OK && g_m2.kind == FB_KIND_JOIN &&
          fb_str_eq(g_m2.run, "demo-1") && g_m2.body.join.num_examples == 4);
    /* no ack yet: the join is repeated after its backoff */
    fb_proto_tick(&g_p, 1200);
    CHECK(g_nsent == 1);
    fb_proto_tick(&g_p, 1600);
    CHECK(g_nsent == 2);
    /* the ack stops the repeats */
    CHECK(fb_wire_decode(&g_m2, g_sent[1].payload, g_sent[1].len) == FB_WIRE_OK);
    fb_msg_init(&g_m, FB_KIND_ACK, fb_s("demo-1"), 0, fb_s("server"), fb_s("a1"));
    g_m.body.ack.ref = fb_s(g_p.join_id);
    feed("fedbus/demo/to/fw-1/server", &g_m, 1700);
    fb_proto_tick(&g_p, 60000);
    CHECK(g_nsent == 2 && g_p.state == FB_STATE_JOINED);
    /* a model too big for one 1024-byte packet: w is 2 x 2 but padded with an unknown field */
    for (i = 0; i < (int)(sizeof w / sizeof w[0]); i++) w[i] = 0.01f * (float)i;
    fb_msg_init(&g_m, FB_KIND_MODEL, fb_s("demo-1"), 1, fb_s("server"), fb_s("model-1"));
    g_m.body.model.weights.count = 3;
    g_m.body.model.weights.items[0].name = fb_s("dense0.w");
    g_m.body.model.weights.items[0].dtype = fb_s("float32");
    g_m.body.model.weights.items[0].ndim = 2;
    g_m.body.model.weights.items[0].shape[0] = 2;
    g_m.body.model.weights.items[0].shape[1] = 2;
    g_m.body.model.weights.items[0].host_f32 = w;
    g_m.body.model.weights.items[1] = g_m.body.model.weights.items[0];
    g_m.body.model.weights.items[1].name = fb_s("dense0.b");
    g_m.body.model.weights.items[1].ndim = 1;
    g_m.body.model.weights.items[2] = g_m.body.model.weights.items[0];
    g_m.body.model.weights.items[2].name = fb_s("padding");
    g_m.body.model.weights.items[2].shape[0] = 100; /* 800 bytes more */
    fb_table_add_int(&g_m.body.model.config, "epochs", 2);
    fb_table_add_float(&g_m.body.model.config, "lr", 0.1);
    sel[0] = fb_s("fw-0");
    sel[1] = fb_s("fw-1");
    CHECK(fb_list_build_str(&g_m.body.model.selected, list_buf, sizeof list_buf, sel, 2));
    CHECK(fb_wire_encode(&g_m, model_buf, sizeof model_buf, &model_len) == FB_WIRE_OK && model_len > 1024);
    {
        /* chunk it the way a server would, deliver chunk 1 first and drop chunk 0 */
        fb_tx tx;
        fb_tx_init(&tx, model_buf, model_len, 500, "bx");
        CHECK(tx.count >= 3);
        for (i = 1; i < (int)tx.count; i++) {
            char id[16];
            sprintf(id, "c%d", i);
            fb_msg_init(&g_m2, FB_KIND_CHUNK, fb_s("demo"), 1, fb_s("server"), fb_s(id));
            fb_tx_chunk(&tx, (uint32_t)i, &g_m2);
            feed("fedbus/demo/out/server/model", &g_m2, 2000);
        }
        CHECK(g_nsent == 2);
        /* a stall: the client asks for chunk 0 */
        fb_proto_tick(&g_p, 3100);
        CHECK(g_nsent == 3 && fb_wire_decode(&g_m, g_sent[2].payload, g_sent[2].len) == FB_WIRE_OK &&
              g_m.kind == FB_KIND_CHUNK_REQUEST && g_m.body.chunk_request.missing.count == 1);
        /* the resend comes to the inbox: the model is complete; the 3-tensor model is refused */
        fb_msg_init(&g_m2, FB_KIND_CHUNK, fb_s("demo"), 1, fb_s("server"), fb_s("c0"));
        fb_tx_chunk(&tx, 0, &g_m2);
        feed("fedbus/demo/to/fw-1/server", &g_m2, 3200);
    }
    /* a credit for the directed resend, then the answer: update_failed (unsupported model) */
    CHECK(g_nsent == 5);
    CHECK(fb_wire_decode(&g_m, g_sent[3].payload, g_sent[3].len) == FB_WIRE_OK && g_m.kind == FB_KIND_CREDIT);
    CHECK(fb_wire_decode(&g_m, g_sent[4].payload, g_sent[4].len) == FB_WIRE_OK &&
          g_m.kind == FB_KIND_UPDATE_FAILED && fb_str_eq(g_m.body.update_failed.reply_to, "model-1"));
    /* round 2: a proper logreg model with a long selected list (so the update is chunked too) */
    {
        fb_str many[60];
        static char names[60][24];
        static uint8_t big_list[2048];
        for (i = 0; i < 60; i++) {
            sprintf(names[i], "node-with-long-name-%02d", i);
            many[i] = fb_s(names[i]);
        }
        many[59] = fb_s("fw-1");
        fb_msg_init(&g_m, FB_KIND_MODEL, fb_s("demo-1"), 2, fb_s("server"), fb_s("model-2"));
        g_m.body.model.weights.count = 2;
        g_m.body.model.weights.items[0].name = fb_s("dense0.w");
        g_m.body.model.weights.items[0].dtype = fb_s("float32");
        g_m.body.model.weights.items[0].ndim = 2;
        g_m.body.model.weights.items[0].shape[0] = 2;
        g_m.body.model.weights.items[0].shape[1] = 2;
        g_m.body.model.weights.items[0].host_f32 = w;
        g_m.body.model.weights.items[1] = g_m.body.model.weights.items[0];
        g_m.body.model.weights.items[1].name = fb_s("dense0.b");
        g_m.body.model.weights.items[1].ndim = 1;
        fb_table_add_int(&g_m.body.model.config, "epochs", 3);
        fb_table_add_float(&g_m.body.model.config, "lr", 0.5);
        fb_table_add_bool(&g_m.body.model.config, "evaluate", 1);
        CHECK(fb_list_build_str(&g_m.body.model.selected, big_list, sizeof big_list, many, 60));
        feed("fedbus/demo/out/server/model", &g_m, 4000);
        /* the same model again (a QoS 1 duplicate with a new id) changes nothing */
        g_m.id = fb_s("model-2b");
        feed("fedbus/demo/out/server/model", &g_m, 4001);
    }
    CHECK(g_nsent == 6 && fb_wire_decode(&g_m, g_sent[5].payload, g_sent[5].len) == FB_WIRE_OK &&
          g_m.kind == FB_KIND_UPDATE && g_m.round == 2 && g_m.body.update.weights.count == 2 &&
          g_m.body.update.num_examples == 4 && fb_table_get(&g_m.body.update.metrics, "eval_accuracy") &&
          fb_table_get(&g_m.body.update.metrics, "train_loss"));
    /* the final evaluation (task: evaluate): an update without tensors */
    fb_msg_init(&g_m, FB_KIND_MODEL, fb_s("demo-1"), 3, fb_s("server"), fb_s("model-3"));
    g_m.body.model.weights.count = 2;
    g_m.body.model.weights.items[0].name = fb_s("dense0.w");
    g_m.body.model.weights.items[0].dtype = fb_s("float32");
    g_m.body.model.weights.items[0].ndim = 2;
    g_m.body.model.weights.items[0].shape[0] = 2;
    g_m.body.model.weights.items[0].shape[1] = 2;
    g_m.body.model.weights.items[0].host_f32 = w;
    g_m.body.model.weights.items[1] = g_m.body.model.weights.items[0];
    g_m.body.model.weights.items[1].name = fb_s("dense0.b");
    g_m.body.model.weights.items[1].ndim = 1;
    fb_table_add_str(&g_m.body.model.config, "task", "evaluate");
    sel[0] = fb_s("*"); /* selected: ["*"], every live node */
    CHECK(fb_list_build_str(&g_m.body.model.selected, list_buf, sizeof list_buf, sel, 1));
    feed("fedbus/demo/out/server/model", &g_m, 5000);
    CHECK(g_nsent == 7 && fb_wire_decode(&g_m, g_sent[6].payload, g_sent[6].len) == FB_WIRE_OK &&
          g_m.kind == FB_KIND_UPDATE && g_m.body.update.weights.count == 0 &&
          fb_table_get(&g_m.body.update.metrics, "eval_num_examples"));
    /* a forged sender (envelope differs from the topic) is dropped */
    fb_msg_init(&g_m, FB_KIND_MANIFEST, fb_s("demo-1"), 9, fb_s("server"), fb_s("m9"));
    g_m.body.manifest.state = fb_s("finished");
    feed("fedbus/demo/out/mallory/manifest", &g_m, 5100);
    CHECK(!fb_proto_done(&g_p));
    feed("fedbus/demo/out/server/manifest", &g_m, 5200);
    CHECK(fb_proto_done(&g_p));
    (void)chunk_msgs;
}

/* A chunked update: credits drive the sender. */
static void test_proto_chunked_update(void) {
    static uint8_t rx_buf[16384], bitmap[64], tx_buf[16384], msg_buf[1024], model_buf[16384];
    static float weights[512], work[1024], x[128 * 3], w[128 * 3 + 3];
    static uint8_t y[3] = {0, 1, 2}, list_buf[32];
    fb_dataset data = {3, 128, x, y};
    fb_proto_config cfg;
    fb_str sel = fb_s("fw-2");
    size_t model_len;
    int i, before;
    for (i = 0; i < 128 * 3; i++) x[i] = (float)(i % 7) * 0.1f;
    memset(&cfg, 0, sizeof cfg);
    cfg.node_id = "fw-2";
    cfg.namespace_ = "demo";
    cfg.max_payload_bytes = 1024;
    cfg.rx_buf = rx_buf;
    cfg.rx_cap = sizeof rx_buf;
    cfg.rx_bitmap = bitmap;
    cfg.rx_max_chunks = 512;
    cfg.tx_buf = tx_buf;
    cfg.tx_cap = sizeof tx_buf;
    cfg.msg_buf = msg_buf;
    cfg.msg_cap = sizeof msg_buf;
    cfg.weights = weights;
    cfg.weights_cap = 512;
    cfg.work = work;
    cfg.work_cap = 1024;
    cfg.data = &data;
    cfg.publish = capture;
    g_nsent = 0;
    CHECK(fb_proto_init(&g_p, &cfg) == 0);
    fb_msg_init(&g_m, FB_KIND_MANIFEST, fb_s("demo-2"), 1, fb_s("server"), fb_s("m0"));
    g_m.body.manifest.state = fb_s("collecting");
    CHECK(fb_list_build_str(&g_m.body.manifest.selected, list_buf, sizeof list_buf, &sel, 1));
    feed("fedbus/demo/out/server/manifest", &g_m, 0);
    CHECK(g_nsent == 1); /* join */
    fb_msg_init(&g_m, FB_KIND_MODEL, fb_s("demo-2"), 1, fb_s("server"), fb_s("model-1"));
    g_m.body.model.weights.count = 2;
    g_m.body.model.weights.items[0].name = fb_s("dense0.w");
    g_m.body.model.weights.items[0].dtype = fb_s("float32");
    g_m.body.model.weights.items[0].ndim = 2;
    g_m.body.model.weights.items[0].shape[0] = 128;
    g_m.body.model.weights.items[0].shape[1] = 3;
    g_m.body.model.weights.items[0].host_f32 = w;
    g_m.body.model.weights.items[1] = g_m.body.model.weights.items[0];
    g_m.body.model.weights.items[1].name = fb_s("dense0.b");
    g_m.body.model.weights.items[1].ndim = 1;
    g_m.body.model.weights.items[1].shape[0] = 3;
    CHECK(fb_list_build_str(&g_m.body.model.selected, list_buf, sizeof list_buf, &sel, 1));
    CHECK(fb_wire_encode(&g_m, model_buf, sizeof model_buf, &model_len) == FB_WIRE_OK);
    fb_proto_on_message(&g_p, "fedbus/demo/out/server/model", model_buf, model_len, 10);
    /* chunk 0 only, until credit */
    CHECK(g_nsent == 2 && fb_proto_sending(&g_p));
    CHECK(fb_wire_decode(&g_m, g_sent[1].payload, g_sent[1].len) == FB_WIRE_OK && g_m.kind == FB_KIND_CHUNK &&
          g_m.body.chunk.index == 0 && g_m.body.chunk.count >= 3 && g_sent[1].len + 30 <= 1024);
    fb_proto_tick(&g_p, 1100); /* no credit for a second: chunk 0 again (a probe) */
    CHECK(g_nsent == 3 && g_p.stats.probes_sent == 1);
    fb_msg_init(&g_m2, FB_KIND_CREDIT, fb_s("demo"), 0, fb_s("server"), fb_s("cr1"));
    g_m2.body.credit.xfer = fb_s(g_p.tx.xfer);
    g_m2.body.credit.upto = 2;
    feed("fedbus/demo/to/fw-2/server", &g_m2, 1200);
    CHECK(g_nsent == 4);
    g_m2.id = fb_s("cr2");
    g_m2.body.credit.upto = 100;
    before = g_nsent;
    feed("fedbus/demo/to/fw-2/server", &g_m2, 1300);
    CHECK(!fb_proto_sending(&g_p) && (uint32_t)(g_nsent - before) == g_p.tx.count - 2);
    CHECK(g_p.stats.updates_sent == 1 && g_p.stats.rounds_trained == 1);
    {
        /* reassemble what was sent: it is the update, bit for bit */
        static uint8_t buf[16384], bm[64];
        fb_rx rx;
        int k, completed = 0;
        fb_rx_init(&rx, buf, sizeof buf, bm, 512);
        for (k = 1; k < g_nsent; k++) {
            CHECK(fb_wire_decode(&g_m, g_sent[k].payload, g_sent[k].len) == FB_WIRE_OK);
            if (fb_rx_feed(&rx, &g_m, fb_s("fw-2"), 0) == FB_RX_COMPLETED) completed = 1;
        }
        CHECK(completed && fb_wire_decode(&g_m, buf, (size_t)rx.size) == FB_WIRE_OK && g_m.kind == FB_KIND_UPDATE &&
              fb_str_eq(g_m.body.update.reply_to, "model-1"));
    }
    /* a chunk request is answered from tx_buf */
    {
        uint64_t miss[1] = {1};
        before = g_nsent;
        fb_msg_init(&g_m2, FB_KIND_CHUNK_REQUEST, fb_s("demo"), 0, fb_s("server"), fb_s("rq"));
        g_m2.body.chunk_request.xfer = fb_s(g_p.tx.xfer);
        CHECK(fb_list_build_uint(&g_m2.body.chunk_request.missing, list_buf, sizeof list_buf, miss, 1));
        feed("fedbus/demo/to/fw-2/server", &g_m2, 1400);
        CHECK(g_nsent == before + 1 && g_p.stats.chunks_resent == 1);
    }
}

int main(void) {
    test_msgpack_ints();
    test_msgpack_containers();
    test_golden_roundtrip();
    test_golden_fields();
    test_encode_update_from_scratch();
    test_decode_rejects();
    test_crc_sha();
    test_golden_chunks();
    test_tx_rx();
    test_trainer();
    test_proto();
    test_proto_chunked_update();
    printf("%d checks, %d failures\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}

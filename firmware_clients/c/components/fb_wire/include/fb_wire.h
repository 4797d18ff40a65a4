/*
 * fb_wire: fedbus messages (docs/wire-format.md sections 3-6).
 *
 * fb_msg holds one message of any kind. Decoding fills it with slices that
 * point into the payload (no copies, no malloc): keep the payload alive as
 * long as the message. Bounded tables: at most FB_MAX_TENSORS tensors and
 * FB_MAX_TABLE scalar entries per table; larger messages are refused
 * (FB_WIRE_ETOOBIG), which a client reports as "out of memory".
 *
 * Encoding writes the canonical form: kind, envelope, body fields in the
 * order of the spec's tables, every field present. Given a message decoded
 * from a canonical payload it reproduces the payload byte for byte.
 */
#ifndef FB_WIRE_H
#define FB_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "fb_msgpack.h"

#ifdef __cplusplus
extern "C" {
#endif

#ifndef FB_MAX_TENSORS
#define FB_MAX_TENSORS 16
#endif
#ifndef FB_MAX_TABLE
#define FB_MAX_TABLE 16
#endif
#define FB_MAX_DIMS 8
#define FB_WIRE_VERSION 1

enum {
    FB_WIRE_OK = 0,
    FB_WIRE_EMALFORMED = -1, /* not MessagePack, wrong types, constraints violated */
    FB_WIRE_EVERSION = -2, /* a major version other than 1 */
    FB_WIRE_EKIND = -3, /* a kind this client does not know */
    FB_WIRE_ETOOBIG = -4, /* more tensors or table entries than the bounds */
    FB_WIRE_EOVERFLOW = -5 /* encode buffer too small */
};

typedef struct {
    const char *p;
    uint32_t n;
} fb_str;

typedef enum {
    FB_KIND_UNKNOWN = 0,
    FB_KIND_JOIN,
    FB_KIND_LEAVE,
    FB_KIND_HEARTBEAT,
    FB_KIND_MODEL,
    FB_KIND_UPDATE,
    FB_KIND_UPDATE_FAILED,
    FB_KIND_MANIFEST,
    FB_KIND_ACK,
    FB_KIND_CHUNK,
    FB_KIND_CHUNK_REQUEST,
    FB_KIND_CREDIT
} fb_kind;

typedef enum { FB_SCALAR_INT, FB_SCALAR_UINT, FB_SCALAR_FLOAT, FB_SCALAR_BOOL, FB_SCALAR_STR } fb_scalar_type;

typedef struct {
    fb_str key;
    fb_scalar_type type;
    int f32; /* FB_SCALAR_FLOAT read as float32 (re-encoded as float32) */
    int64_t i;
    uint64_t u;
    double f;
    int b;
    fb_str s;
} fb_scalar;

typedef struct {
    fb_scalar items[FB_MAX_TABLE];
    uint32_t count;
} fb_table;

typedef struct {
    fb_str name;
    fb_str dtype;
    uint32_t ndim;
    uint64_t shape[FB_MAX_DIMS];
    /* Little-endian element bytes (decoded: a pointer into the payload, unaligned). */
    const uint8_t *data;
    size_t nbytes;
    /* Encoding only: when set, data points at host floats (float32) to be written
     * little-endian, whatever the CPU's byte order. */
    const float *host_f32;
} fb_tensor;

typedef struct {
    fb_tensor items[FB_MAX_TENSORS];
    uint32_t count;
} fb_weights;

/* An array of str or int kept as the raw MessagePack region (no bound on length). */
typedef struct {
    const uint8_t *raw;
    size_t raw_len;
    uint32_t count;
} fb_list;

typedef struct {
    fb_kind kind;
    int64_t v;
    fb_str run;
    uint64_t round;
    fb_str sender;
    fb_str id;
    union {
        struct {
            fb_str role;
            uint64_t num_examples;
            fb_table capabilities;
        } join;
        struct {
            fb_str reason;
        } leave;
        struct {
            fb_str status;
            fb_table metrics;
        } heartbeat;
        struct {
            fb_weights weights;
            fb_str encoding;
            fb_table config;
            fb_list selected; /* of str */
        } model;
        struct {
            fb_weights weights;
            uint64_t num_examples;
            fb_str encoding;
            fb_str reply_to;
            fb_table metrics;
        } update;
        struct {
            fb_str reason;
            fb_str reply_to;
        } update_failed;
        struct {
            fb_str state;
            uint64_t attempt;
            uint64_t completed_round;
            uint64_t rounds;
            fb_str model_id;
            fb_list selected; /* of str */
        } manifest;
        struct {
            fb_str ref;
            fb_str status;
            fb_str detail;
        } ack;
        struct {
            fb_str xfer;
            uint64_t index;
            uint64_t count;
            uint64_t size;
            const uint8_t *digest; /* 32 bytes; NULL: an empty bin (only before the last chunk) */
            uint32_t crc;
            const uint8_t *data;
            uint32_t data_len;
        } chunk;
        struct {
            fb_str xfer;
            fb_list missing; /* of int */
        } chunk_request;
        struct {
            fb_str xfer;
            uint64_t upto;
        } credit;
    } body;
} fb_msg;

fb_str fb_s(const char *cstr);
int fb_str_eq(fb_str a, const char *cstr);
int fb_str_eq2(fb_str a, fb_str b);
const char *fb_kind_name(fb_kind kind);

/* Initialise a message of `kind` with the envelope and every default. */
void fb_msg_init(fb_msg *m, fb_kind kind, fb_str run, uint64_t round, fb_str sender, fb_str id);

/* Decode one whole payload (trailing bytes are an error). Returns FB_WIRE_*. */
int fb_wire_decode(fb_msg *m, const uint8_t *payload, size_t len);

/* Encode into buf (cap bytes); *out_len gets the size (also when it overflows). */
int fb_wire_encode(const fb_msg *m, uint8_t *buf, size_t cap, size_t *out_len);
void fb_wire_write(fb_mp_writer *w, const fb_msg *m);

/* Lists: iterate the raw region. */
typedef struct {
    fb_mp_reader r;
    uint32_t left;
} fb_list_iter;
void fb_list_begin(fb_list_iter *it, const fb_list *list);
int fb_list_next_str(fb_list_iter *it, fb_str *out);
int fb_list_next_uint(fb_list_iter *it, uint64_t *out);
int fb_list_contains(const fb_list *list, fb_str value);
/* Build a list of str / uint into buf (for encoding); returns 0 when buf is too small. */
int fb_list_build_str(fb_list *list, uint8_t *buf, size_t cap, const fb_str *items, uint32_t n);
int fb_list_build_uint(fb_list *list, uint8_t *buf, size_t cap, const uint64_t *items, uint32_t n);

/* Tables and tensors. */
const fb_scalar *fb_table_get(const fb_table *t, const char *key);
int fb_table_number(const fb_table *t, const char *key, double *out); /* int or float */
int fb_table_add_float(fb_table *t, const char *key, double v);
int fb_table_add_int(fb_table *t, const char *key, int64_t v);
int fb_table_add_str(fb_table *t, const char *key, const char *v);
int fb_table_add_bool(fb_table *t, const char *key, int v);
const fb_tensor *fb_weights_get(const fb_weights *w, const char *name);
/* itemsize of a dtype name, 0 if unknown. */
size_t fb_dtype_size(fb_str dtype);
/* product(shape), 1 for 0-d. */
uint64_t fb_tensor_elems(const fb_tensor *t);

#ifdef __cplusplus
}
#endif
#endif

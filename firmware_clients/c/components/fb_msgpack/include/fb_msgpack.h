/*
 * fb_msgpack: the MessagePack subset of the fedbus wire format
 * (docs/wire-format.md section 2): map, array, str, bin, int, float32/64, bool.
 * No nil, no extension types.
 *
 * Writer: appends to a caller-provided buffer. It never writes past `cap`;
 * on overflow it sets `overflow` and keeps counting `len`, so a first pass
 * with buf = NULL, cap = 0 measures the encoded size.
 *
 * Reader: walks a caller-provided buffer without allocating. Strings and bin
 * values are returned as pointers into the buffer. Any error (truncated
 * input, wrong type, nil or ext, nesting too deep) latches `err` and every
 * later call fails too, so callers may check once at the end.
 */
#ifndef FB_MSGPACK_H
#define FB_MSGPACK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Deepest nesting fb_mp_skip accepts (no valid message nests deeper than 4). */
#define FB_MP_MAX_DEPTH 16

typedef struct {
    uint8_t *buf;
    size_t cap;
    size_t len;
    int overflow;
} fb_mp_writer;

void fb_mp_writer_init(fb_mp_writer *w, uint8_t *buf, size_t cap);
void fb_mp_write_raw(fb_mp_writer *w, const void *data, size_t n);
void fb_mp_write_map(fb_mp_writer *w, uint32_t n);
void fb_mp_write_array(fb_mp_writer *w, uint32_t n);
void fb_mp_write_str(fb_mp_writer *w, const char *s, size_t n);
void fb_mp_write_cstr(fb_mp_writer *w, const char *s);
void fb_mp_write_bin_header(fb_mp_writer *w, uint32_t n);
void fb_mp_write_bin(fb_mp_writer *w, const void *data, uint32_t n);
void fb_mp_write_uint(fb_mp_writer *w, uint64_t v);
void fb_mp_write_int(fb_mp_writer *w, int64_t v);
void fb_mp_write_f32(fb_mp_writer *w, float v);
void fb_mp_write_f64(fb_mp_writer *w, double v);
void fb_mp_write_bool(fb_mp_writer *w, int v);

/* Value families as the reader sees them. */
typedef enum {
    FB_MP_ERROR = 0,
    FB_MP_MAP,
    FB_MP_ARRAY,
    FB_MP_STR,
    FB_MP_BIN,
    FB_MP_INT, /* fits int64_t */
    FB_MP_UINT, /* above INT64_MAX, fits uint64_t */
    FB_MP_FLOAT,
    FB_MP_BOOL,
    FB_MP_NIL, /* rejected by every read_* call */
    FB_MP_EXT /* rejected by every read_* call */
} fb_mp_type;

typedef struct {
    const uint8_t *buf;
    size_t len;
    size_t pos;
    int err;
} fb_mp_reader;

void fb_mp_reader_init(fb_mp_reader *r, const uint8_t *buf, size_t len);
fb_mp_type fb_mp_peek(fb_mp_reader *r);
int fb_mp_read_map(fb_mp_reader *r, uint32_t *n);
int fb_mp_read_array(fb_mp_reader *r, uint32_t *n);
int fb_mp_read_str(fb_mp_reader *r, const char **s, uint32_t *n);
int fb_mp_read_bin(fb_mp_reader *r, const uint8_t **p, uint32_t *n);
/* Any int format; *is_big set when the value exceeds INT64_MAX (then *u holds it). */
int fb_mp_read_int(fb_mp_reader *r, int64_t *i, uint64_t *u, int *is_big);
/* A non-negative int (any format) into uint64_t. */
int fb_mp_read_uint(fb_mp_reader *r, uint64_t *u);
/* float32 or float64 as a double; *was_f32 set for float32. */
int fb_mp_read_float(fb_mp_reader *r, double *d, int *was_f32);
int fb_mp_read_bool(fb_mp_reader *r, int *b);
/* Skip one value of any family (nil and ext too: unknown fields may hold them). */
int fb_mp_skip(fb_mp_reader *r);

/* Byte order helpers (tensor contents are little-endian). */
void fb_put_f32le(uint8_t *p, float v);
float fb_get_f32le(const uint8_t *p);

#ifdef __cplusplus
}
#endif
#endif

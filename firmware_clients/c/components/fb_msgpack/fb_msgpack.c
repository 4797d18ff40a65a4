/* fb_msgpack: see fb_msgpack.h. Written for fedbus from the MessagePack spec. */
#include "fb_msgpack.h"

#include <string.h>

/* ---- writer ------------------------------------------------------------- */

void fb_mp_writer_init(fb_mp_writer *w, uint8_t *buf, size_t cap) {
    w->buf = buf;
    w->cap = buf ? cap : 0;
    w->len = 0;
    w->overflow = 0;
}

void fb_mp_write_raw(fb_mp_writer *w, const void *data, size_t n) {
    if (w->len + n <= w->cap && !w->overflow) {
        if (n) memcpy(w->buf + w->len, data, n);
    } else {
        w->overflow = 1;
    }
    w->len += n;
}

static void put_be(fb_mp_writer *w, uint8_t tag, uint64_t v, int bytes) {
    uint8_t tmp[9];
    int i;
    tmp[0] = tag;
    for (i = 0; i < bytes; i++) tmp[1 + i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
    fb_mp_write_raw(w, tmp, (size_t)bytes + 1);
}

static void put_byte(fb_mp_writer *w, uint8_t b) { fb_mp_write_raw(w, &b, 1); }

static void put_container(fb_mp_writer *w, uint32_t n, uint8_t fix, uint8_t t16, uint8_t t32) {
    if (n < 16)
        put_byte(w, (uint8_t)(fix | n));
    else if (n <= 0xffff)
        put_be(w, t16, n, 2);
    else
        put_be(w, t32, n, 4);
}

void fb_mp_write_map(fb_mp_writer *w, uint32_t n) { put_container(w, n, 0x80, 0xde, 0xdf); }
void fb_mp_write_array(fb_mp_writer *w, uint32_t n) { put_container(w, n, 0x90, 0xdc, 0xdd); }

void fb_mp_write_str(fb_mp_writer *w, const char *s, size_t n) {
    if (n < 32)
        put_byte(w, (uint8_t)(0xa0 | n));
    else if (n <= 0xff)
        put_be(w, 0xd9, n, 1);
    else if (n <= 0xffff)
        put_be(w, 0xda, n, 2);
    else
        put_be(w, 0xdb, n, 4);
    fb_mp_write_raw(w, s, n);
}

void fb_mp_write_cstr(fb_mp_writer *w, const char *s) { fb_mp_write_str(w, s, strlen(s)); }

void fb_mp_write_bin_header(fb_mp_writer *w, uint32_t n) {
    if (n <= 0xff)
        put_be(w, 0xc4, n, 1);
    else if (n <= 0xffff)
        put_be(w, 0xc5, n, 2);
    else
        put_be(w, 0xc6, n, 4);
}

void fb_mp_write_bin(fb_mp_writer *w, const void *data, uint32_t n) {
    fb_mp_write_bin_header(w, n);
    fb_mp_write_raw(w, data, n);
}

void fb_mp_write_uint(fb_mp_writer *w, uint64_t v) {
    if (v < 0x80)
        put_byte(w, (uint8_t)v);
    else if (v <= 0xff)
        put_be(w, 0xcc, v, 1);
    else if (v <= 0xffff)
        put_be(w, 0xcd, v, 2);
    else if (v <= 0xffffffffu)
        put_be(w, 0xce, v, 4);
    else
        put_be(w, 0xcf, v, 8);
}

void fb_mp_write_int(fb_mp_writer *w, int64_t v) {
    if (v >= 0) {
        fb_mp_write_uint(w, (uint64_t)v);
    } else if (v >= -32) {
        put_byte(w, (uint8_t)(int8_t)v);
    } else if (v >= -128) {
        put_be(w, 0xd0, (uint64_t)v & 0xff, 1);
    } else if (v >= -32768) {
        put_be(w, 0xd1, (uint64_t)v & 0xffff, 2);
    } else if (v >= -2147483647 - 1) {
        put_be(w, 0xd2, (uint64_t)v & 0xffffffffu, 4);
    } else {
        put_be(w, 0xd3, (uint64_t)v, 8);
    }
}

void fb_mp_write_f32(fb_mp_writer *w, float v) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    put_be(w, 0xca, bits, 4);
}

void fb_mp_write_f64(fb_mp_writer *w, double v) {
    uint64_t bits;
    memcpy(&bits, &v, 8);
    put_be(w, 0xcb, bits, 8);
}

void fb_mp_write_bool(fb_mp_writer *w, int v) { put_byte(w, v ? 0xc3 : 0xc2); }

/* ---- reader ------------------------------------------------------------- */

void fb_mp_reader_init(fb_mp_reader *r, const uint8_t *buf, size_t len) {
    r->buf = buf;
    r->len = len;
    r->pos = 0;
    r->err = 0;
}

static int fail(fb_mp_reader *r) {
    r->err = 1;
    return 0;
}

static int need(fb_mp_reader *r, size_t n) {
    if (r->err || n > r->len - r->pos) return fail(r);
    return 1;
}

static uint64_t get_be(const uint8_t *p, int bytes) {
    uint64_t v = 0;
    int i;
    for (i = 0; i < bytes; i++) v = (v << 8) | p[i];
    return v;
}

fb_mp_type fb_mp_peek(fb_mp_reader *r) {
    uint8_t b;
    if (r->err || r->pos >= r->len) return FB_MP_ERROR;
    b = r->buf[r->pos];
    if (b <= 0x7f || b >= 0xe0) return FB_MP_INT;
    if (b <= 0x8f) return FB_MP_MAP;
    if (b <= 0x9f) return FB_MP_ARRAY;
    if (b <= 0xbf) return FB_MP_STR;
    switch (b) {
    case 0xc0: return FB_MP_NIL;
    case 0xc2:
    case 0xc3: return FB_MP_BOOL;
    case 0xc4:
    case 0xc5:
    case 0xc6: return FB_MP_BIN;
    case 0xca:
    case 0xcb: return FB_MP_FLOAT;
    case 0xcc:
    case 0xcd:
    case 0xce:
    case 0xd0:
    case 0xd1:
    case 0xd2:
    case 0xd3: return FB_MP_INT;
    case 0xcf:
        if (r->pos + 9 <= r->len && get_be(r->buf + r->pos + 1, 8) > (uint64_t)INT64_MAX) return FB_MP_UINT;
        return FB_MP_INT;
    case 0xd9:
    case 0xda:
    case 0xdb: return FB_MP_STR;
    case 0xdc:
    case 0xdd: return FB_MP_ARRAY;
    case 0xde:
    case 0xdf: return FB_MP_MAP;
    default: return FB_MP_EXT; /* 0xc1 (never used) counts as invalid too */
    }
}

static int read_len(fb_mp_reader *r, uint8_t fixbase, uint8_t fixmask, uint8_t t8, uint8_t t16, uint8_t t32,
                    uint32_t *n) {
    uint8_t b;
    if (!need(r, 1)) return 0;
    b = r->buf[r->pos];
    if ((b & (uint8_t)~fixmask) == fixbase) {
        *n = b & fixmask;
        r->pos += 1;
        return 1;
    }
    if (t8 && b == t8) {
        if (!need(r, 2)) return 0;
        *n = r->buf[r->pos + 1];
        r->pos += 2;
        return 1;
    }
    if (b == t16) {
        if (!need(r, 3)) return 0;
        *n = (uint32_t)get_be(r->buf + r->pos + 1, 2);
        r->pos += 3;
        return 1;
    }
    if (b == t32) {
        if (!need(r, 5)) return 0;
        *n = (uint32_t)get_be(r->buf + r->pos + 1, 4);
        r->pos += 5;
        return 1;
    }
    return fail(r);
}

int fb_mp_read_map(fb_mp_reader *r, uint32_t *n) {
    if (!read_len(r, 0x80, 0x0f, 0, 0xde, 0xdf, n)) return 0;
    /* each entry takes at least 2 bytes: refuse counts the input cannot hold */
    if ((uint64_t)*n * 2 > r->len - r->pos) return fail(r);
    return 1;
}

int fb_mp_read_array(fb_mp_reader *r, uint32_t *n) {
    if (!read_len(r, 0x90, 0x0f, 0, 0xdc, 0xdd, n)) return 0;
    if ((uint64_t)*n > r->len - r->pos) return fail(r);
    return 1;
}

int fb_mp_read_str(fb_mp_reader *r, const char **s, uint32_t *n) {
    if (!read_len(r, 0xa0, 0x1f, 0xd9, 0xda, 0xdb, n)) return 0;
    if (!need(r, *n)) return 0;
    *s = (const char *)(r->buf + r->pos);
    r->pos += *n;
    return 1;
}

int fb_mp_read_bin(fb_mp_reader *r, const uint8_t **p, uint32_t *n) {
    uint8_t b;
    if (!need(r, 1)) return 0;
    b = r->buf[r->pos];
    if (b < 0xc4 || b > 0xc6) return fail(r);
    {
        int w = b == 0xc4 ? 1 : b == 0xc5 ? 2 : 4;
        if (!need(r, 1 + (size_t)w)) return 0;
        *n = (uint32_t)get_be(r->buf + r->pos + 1, w);
        r->pos += 1 + (size_t)w;
    }
    if (!need(r, *n)) return 0;
    *p = r->buf + r->pos;
    r->pos += *n;
    return 1;
}

int fb_mp_read_int(fb_mp_reader *r, int64_t *i, uint64_t *u, int *is_big) {
    uint8_t b;
    int w = 0, sign = 0;
    uint64_t raw;
    *is_big = 0;
    if (!need(r, 1)) return 0;
    b = r->buf[r->pos];
    if (b <= 0x7f) {
        *i = b;
        *u = b;
        r->pos += 1;
        return 1;
    }
    if (b >= 0xe0) {
        *i = (int8_t)b;
        *u = 0;
        r->pos += 1;
        return 1;
    }
    switch (b) {
    case 0xcc: w = 1; break;
    case 0xcd: w = 2; break;
    case 0xce: w = 4; break;
    case 0xcf: w = 8; break;
    case 0xd0: w = 1; sign = 1; break;
    case 0xd1: w = 2; sign = 1; break;
    case 0xd2: w = 4; sign = 1; break;
    case 0xd3: w = 8; sign = 1; break;
    default: return fail(r);
    }
    if (!need(r, 1 + (size_t)w)) return 0;
    raw = get_be(r->buf + r->pos + 1, w);
    r->pos += 1 + (size_t)w;
    if (sign) {
        int64_t v;
        if (w == 1) v = (int8_t)raw;
        else if (w == 2) v = (int16_t)raw;
        else if (w == 4) v = (int32_t)raw;
        else v = (int64_t)raw;
        *i = v;
        *u = v >= 0 ? (uint64_t)v : 0;
    } else {
        *u = raw;
        if (raw > (uint64_t)INT64_MAX) {
            *is_big = 1;
            *i = 0;
        } else {
            *i = (int64_t)raw;
        }
    }
    return 1;
}

int fb_mp_read_uint(fb_mp_reader *r, uint64_t *u) {
    int64_t i;
    int big;
    if (!fb_mp_read_int(r, &i, u, &big)) return 0;
    if (!big && i < 0) return fail(r);
    return 1;
}

int fb_mp_read_float(fb_mp_reader *r, double *d, int *was_f32) {
    uint8_t b;
    if (!need(r, 1)) return 0;
    b = r->buf[r->pos];
    if (b == 0xca) {
        uint32_t bits;
        float f;
        if (!need(r, 5)) return 0;
        bits = (uint32_t)get_be(r->buf + r->pos + 1, 4);
        memcpy(&f, &bits, 4);
        *d = f;
        *was_f32 = 1;
        r->pos += 5;
        return 1;
    }
    if (b == 0xcb) {
        uint64_t bits;
        if (!need(r, 9)) return 0;
        bits = get_be(r->buf + r->pos + 1, 8);
        memcpy(d, &bits, 8);
        *was_f32 = 0;
        r->pos += 9;
        return 1;
    }
    return fail(r);
}

int fb_mp_read_bool(fb_mp_reader *r, int *v) {
    if (!need(r, 1)) return 0;
    if (r->buf[r->pos] == 0xc2 || r->buf[r->pos] == 0xc3) {
        *v = r->buf[r->pos] == 0xc3;
        r->pos += 1;
        return 1;
    }
    return fail(r);
}

static int skip_depth(fb_mp_reader *r, int depth) {
    uint32_t n, k;
    const char *s;
    const uint8_t *p;
    int64_t i;
    uint64_t u;
    int big, f32, b;
    double d;
    if (depth > FB_MP_MAX_DEPTH) return fail(r);
    switch (fb_mp_peek(r)) {
    case FB_MP_MAP:
        if (!fb_mp_read_map(r, &n)) return 0;
        for (k = 0; k < n; k++)
            if (!skip_depth(r, depth + 1) || !skip_depth(r, depth + 1)) return 0;
        return 1;
    case FB_MP_ARRAY:
        if (!fb_mp_read_array(r, &n)) return 0;
        for (k = 0; k < n; k++)
            if (!skip_depth(r, depth + 1)) return 0;
        return 1;
    case FB_MP_STR: return fb_mp_read_str(r, &s, &n);
    case FB_MP_BIN: return fb_mp_read_bin(r, &p, &n);
    case FB_MP_INT:
    case FB_MP_UINT: return fb_mp_read_int(r, &i, &u, &big);
    case FB_MP_FLOAT: return fb_mp_read_float(r, &d, &f32);
    case FB_MP_BOOL: return fb_mp_read_bool(r, &b);
    case FB_MP_NIL: r->pos += 1; return 1;
    case FB_MP_EXT: {
        uint8_t t = r->buf[r->pos];
        size_t len = 0, hdr = 2;
        if (t == 0xc1) return fail(r);
        if (t >= 0xd4 && t <= 0xd8) {
            len = (size_t)1 << (t - 0xd4);
        } else {
            int w = t == 0xc7 ? 1 : t == 0xc8 ? 2 : 4;
            if (!need(r, 1 + (size_t)w)) return 0;
            len = (size_t)get_be(r->buf + r->pos + 1, w);
            hdr = 1 + (size_t)w + 1;
        }
        if (!need(r, hdr + len)) return 0;
        r->pos += hdr + len;
        return 1;
    }
    default: return fail(r);
    }
}

int fb_mp_skip(fb_mp_reader *r) { return skip_depth(r, 0); }

void fb_put_f32le(uint8_t *p, float v) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    p[0] = (uint8_t)bits;
    p[1] = (uint8_t)(bits >> 8);
    p[2] = (uint8_t)(bits >> 16);
    p[3] = (uint8_t)(bits >> 24);
}

float fb_get_f32le(const uint8_t *p) {
    uint32_t bits = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

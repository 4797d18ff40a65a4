/* fb_wire: see fb_wire.h and docs/wire-format.md. */
#include "fb_wire.h"

#include <string.h>

static const char *const KIND_NAMES[] = {"",         "join",          "leave",  "heartbeat",
                                         "model",    "update",        "update_failed", "manifest",
                                         "ack",      "chunk",         "chunk_request", "credit"};
#define NUM_KINDS ((int)(sizeof KIND_NAMES / sizeof KIND_NAMES[0]))

static const struct {
    const char *name;
    size_t size;
} DTYPES[] = {{"bool", 1},   {"int8", 1},   {"uint8", 1},   {"int16", 2},   {"uint16", 2},  {"int32", 4},
              {"uint32", 4}, {"int64", 8},  {"uint64", 8},  {"float16", 2}, {"float32", 4}, {"float64", 8}};

fb_str fb_s(const char *cstr) {
    fb_str s;
    s.p = cstr ? cstr : "";
    s.n = (uint32_t)strlen(s.p);
    return s;
}

int fb_str_eq(fb_str a, const char *cstr) {
    size_t n = strlen(cstr);
    return a.n == n && (n == 0 || memcmp(a.p, cstr, n) == 0);
}

int fb_str_eq2(fb_str a, fb_str b) { return a.n == b.n && (a.n == 0 || memcmp(a.p, b.p, a.n) == 0); }

const char *fb_kind_name(fb_kind kind) {
    return (int)kind > 0 && (int)kind < NUM_KINDS ? KIND_NAMES[kind] : "";
}

size_t fb_dtype_size(fb_str dtype) {
    size_t i;
    for (i = 0; i < sizeof DTYPES / sizeof DTYPES[0]; i++)
        if (fb_str_eq(dtype, DTYPES[i].name)) return DTYPES[i].size;
    return 0;
}

uint64_t fb_tensor_elems(const fb_tensor *t) {
    uint64_t n = 1;
    uint32_t i;
    for (i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

void fb_msg_init(fb_msg *m, fb_kind kind, fb_str run, uint64_t round, fb_str sender, fb_str id) {
    memset(m, 0, sizeof *m);
    m->kind = kind;
    m->v = FB_WIRE_VERSION;
    m->run = run;
    m->round = round;
    m->sender = sender;
    m->id = id;
    switch (kind) {
    case FB_KIND_JOIN: m->body.join.role = fb_s("client"); break;
    case FB_KIND_HEARTBEAT: m->body.heartbeat.status = fb_s("alive"); break;
    case FB_KIND_MODEL: m->body.model.encoding = fb_s("dense"); break;
    case FB_KIND_UPDATE: m->body.update.encoding = fb_s("dense"); break;
    case FB_KIND_ACK: m->body.ack.status = fb_s("ok"); break;
    default: break;
    }
}

/* ---- lists -------------------------------------------------------------- */

void fb_list_begin(fb_list_iter *it, const fb_list *list) {
    fb_mp_reader_init(&it->r, list->raw, list->raw_len);
    it->left = 0;
    if (list->raw_len && fb_mp_read_array(&it->r, &it->left) == 0) it->left = 0;
}

int fb_list_next_str(fb_list_iter *it, fb_str *out) {
    if (!it->left) return 0;
    it->left--;
    return fb_mp_read_str(&it->r, &out->p, &out->n);
}

int fb_list_next_uint(fb_list_iter *it, uint64_t *out) {
    if (!it->left) return 0;
    it->left--;
    return fb_mp_read_uint(&it->r, out);
}

int fb_list_contains(const fb_list *list, fb_str value) {
    fb_list_iter it;
    fb_str s;
    fb_list_begin(&it, list);
    while (fb_list_next_str(&it, &s))
        if (fb_str_eq2(s, value)) return 1;
    return 0;
}

int fb_list_build_str(fb_list *list, uint8_t *buf, size_t cap, const fb_str *items, uint32_t n) {
    fb_mp_writer w;
    uint32_t i;
    fb_mp_writer_init(&w, buf, cap);
    fb_mp_write_array(&w, n);
    for (i = 0; i < n; i++) fb_mp_write_str(&w, items[i].p, items[i].n);
    if (w.overflow) return 0;
    list->raw = buf;
    list->raw_len = w.len;
    list->count = n;
    return 1;
}

int fb_list_build_uint(fb_list *list, uint8_t *buf, size_t cap, const uint64_t *items, uint32_t n) {
    fb_mp_writer w;
    uint32_t i;
    fb_mp_writer_init(&w, buf, cap);
    fb_mp_write_array(&w, n);
    for (i = 0; i < n; i++) fb_mp_write_uint(&w, items[i]);
    if (w.overflow) return 0;
    list->raw = buf;
    list->raw_len = w.len;
    list->count = n;
    return 1;
}

/* ---- tables and tensors ------------------------------------------------- */

const fb_scalar *fb_table_get(const fb_table *t, const char *key) {
    uint32_t i;
    const fb_scalar *found = NULL;
    for (i = 0; i < t->count; i++)
        if (fb_str_eq(t->items[i].key, key)) found = &t->items[i]; /* the last occurrence wins */
    return found;
}

int fb_table_number(const fb_table *t, const char *key, double *out) {
    const fb_scalar *s = fb_table_get(t, key);
    if (!s) return 0;
    switch (s->type) {
    case FB_SCALAR_INT: *out = (double)s->i; return 1;
    case FB_SCALAR_UINT: *out = (double)s->u; return 1;
    case FB_SCALAR_FLOAT: *out = s->f; return 1;
    default: return 0;
    }
}

static fb_scalar *table_add(fb_table *t, const char *key) {
    fb_scalar *s;
    if (t->count >= FB_MAX_TABLE) return NULL;
    s = &t->items[t->count++];
    memset(s, 0, sizeof *s);
    s->key = fb_s(key);
    return s;
}

int fb_table_add_float(fb_table *t, const char *key, double v) {
    fb_scalar *s = table_add(t, key);
    if (!s) return 0;
    s->type = FB_SCALAR_FLOAT;
    s->f = v;
    return 1;
}

int fb_table_add_int(fb_table *t, const char *key, int64_t v) {
    fb_scalar *s = table_add(t, key);
    if (!s) return 0;
    s->type = FB_SCALAR_INT;
    s->i = v;
    return 1;
}

int fb_table_add_str(fb_table *t, const char *key, const char *v) {
    fb_scalar *s = table_add(t, key);
    if (!s) return 0;
    s->type = FB_SCALAR_STR;
    s->s = fb_s(v);
    return 1;
}

int fb_table_add_bool(fb_table *t, const char *key, int v) {
    fb_scalar *s = table_add(t, key);
    if (!s) return 0;
    s->type = FB_SCALAR_BOOL;
    s->b = v != 0;
    return 1;
}

const fb_tensor *fb_weights_get(const fb_weights *w, const char *name) {
    uint32_t i;
    for (i = 0; i < w->count; i++)
        if (fb_str_eq(w->items[i].name, name)) return &w->items[i];
    return NULL;
}

/* ---- encoding ----------------------------------------------------------- */

static void w_str(fb_mp_writer *w, fb_str s) { fb_mp_write_str(w, s.p ? s.p : "", s.p ? s.n : 0); }

static void w_key(fb_mp_writer *w, const char *key) { fb_mp_write_cstr(w, key); }

static void w_table(fb_mp_writer *w, const fb_table *t) {
    uint32_t i;
    fb_mp_write_map(w, t->count);
    for (i = 0; i < t->count; i++) {
        const fb_scalar *s = &t->items[i];
        w_str(w, s->key);
        switch (s->type) {
        case FB_SCALAR_INT: fb_mp_write_int(w, s->i); break;
        case FB_SCALAR_UINT: fb_mp_write_uint(w, s->u); break;
        case FB_SCALAR_FLOAT:
            if (s->f32)
                fb_mp_write_f32(w, (float)s->f);
            else
                fb_mp_write_f64(w, s->f);
            break;
        case FB_SCALAR_BOOL: fb_mp_write_bool(w, s->b); break;
        case FB_SCALAR_STR: w_str(w, s->s); break;
        }
    }
}

static void w_weights(fb_mp_writer *w, const fb_weights *ws) {
    uint32_t i, d;
    fb_mp_write_map(w, ws->count);
    for (i = 0; i < ws->count; i++) {
        const fb_tensor *t = &ws->items[i];
        w_str(w, t->name);
        fb_mp_write_map(w, 3);
        w_key(w, "dtype");
        w_str(w, t->dtype);
        w_key(w, "shape");
        fb_mp_write_array(w, t->ndim);
        for (d = 0; d < t->ndim; d++) fb_mp_write_uint(w, t->shape[d]);
        w_key(w, "data");
        if (t->host_f32) {
            uint64_t k, n = fb_tensor_elems(t);
            fb_mp_write_bin_header(w, (uint32_t)(n * 4));
            for (k = 0; k < n; k++) {
                uint8_t le[4];
                fb_put_f32le(le, t->host_f32[k]);
                fb_mp_write_raw(w, le, 4);
            }
        } else {
            fb_mp_write_bin(w, t->data, (uint32_t)t->nbytes);
        }
    }
}

static void w_list(fb_mp_writer *w, const fb_list *l) {
    if (l->raw_len)
        fb_mp_write_raw(w, l->raw, l->raw_len);
    else
        fb_mp_write_array(w, 0);
}

static const uint32_t BODY_FIELDS[] = {0, 3, 1, 2, 4, 5, 2, 6, 3, 7, 2, 2};

void fb_wire_write(fb_mp_writer *w, const fb_msg *m) {
    const uint32_t envelope = 6;
    fb_mp_write_map(w, envelope + BODY_FIELDS[m->kind]);
    w_key(w, "kind");
    fb_mp_write_cstr(w, fb_kind_name(m->kind));
    w_key(w, "v");
    fb_mp_write_int(w, m->v);
    w_key(w, "run");
    w_str(w, m->run);
    w_key(w, "round");
    fb_mp_write_uint(w, m->round);
    w_key(w, "sender");
    w_str(w, m->sender);
    w_key(w, "id");
    w_str(w, m->id);
    switch (m->kind) {
    case FB_KIND_JOIN:
        w_key(w, "role");
        w_str(w, m->body.join.role);
        w_key(w, "num_examples");
        fb_mp_write_uint(w, m->body.join.num_examples);
        w_key(w, "capabilities");
        w_table(w, &m->body.join.capabilities);
        break;
    case FB_KIND_LEAVE:
        w_key(w, "reason");
        w_str(w, m->body.leave.reason);
        break;
    case FB_KIND_HEARTBEAT:
        w_key(w, "status");
        w_str(w, m->body.heartbeat.status);
        w_key(w, "metrics");
        w_table(w, &m->body.heartbeat.metrics);
        break;
    case FB_KIND_MODEL:
        w_key(w, "weights");
        w_weights(w, &m->body.model.weights);
        w_key(w, "encoding");
        w_str(w, m->body.model.encoding);
        w_key(w, "config");
        w_table(w, &m->body.model.config);
        w_key(w, "selected");
        w_list(w, &m->body.model.selected);
        break;
    case FB_KIND_UPDATE:
        w_key(w, "weights");
        w_weights(w, &m->body.update.weights);
        w_key(w, "num_examples");
        fb_mp_write_uint(w, m->body.update.num_examples);
        w_key(w, "encoding");
        w_str(w, m->body.update.encoding);
        w_key(w, "reply_to");
        w_str(w, m->body.update.reply_to);
        w_key(w, "metrics");
        w_table(w, &m->body.update.metrics);
        break;
    case FB_KIND_UPDATE_FAILED:
        w_key(w, "reason");
        w_str(w, m->body.update_failed.reason);
        w_key(w, "reply_to");
        w_str(w, m->body.update_failed.reply_to);
        break;
    case FB_KIND_MANIFEST:
        w_key(w, "state");
        w_str(w, m->body.manifest.state);
        w_key(w, "attempt");
        fb_mp_write_uint(w, m->body.manifest.attempt);
        w_key(w, "completed_round");
        fb_mp_write_uint(w, m->body.manifest.completed_round);
        w_key(w, "rounds");
        fb_mp_write_uint(w, m->body.manifest.rounds);
        w_key(w, "model_id");
        w_str(w, m->body.manifest.model_id);
        w_key(w, "selected");
        w_list(w, &m->body.manifest.selected);
        break;
    case FB_KIND_ACK:
        w_key(w, "ref");
        w_str(w, m->body.ack.ref);
        w_key(w, "status");
        w_str(w, m->body.ack.status);
        w_key(w, "detail");
        w_str(w, m->body.ack.detail);
        break;
    case FB_KIND_CHUNK:
        w_key(w, "xfer");
        w_str(w, m->body.chunk.xfer);
        w_key(w, "index");
        fb_mp_write_uint(w, m->body.chunk.index);
        w_key(w, "count");
        fb_mp_write_uint(w, m->body.chunk.count);
        w_key(w, "size");
        fb_mp_write_uint(w, m->body.chunk.size);
        w_key(w, "digest");
        {
            static const uint8_t none[1] = {0};
            fb_mp_write_bin(w, m->body.chunk.digest ? m->body.chunk.digest : none, m->body.chunk.digest ? 32 : 0);
        }
        w_key(w, "crc");
        fb_mp_write_uint(w, m->body.chunk.crc);
        w_key(w, "data");
        fb_mp_write_bin(w, m->body.chunk.data, m->body.chunk.data_len);
        break;
    case FB_KIND_CHUNK_REQUEST:
        w_key(w, "xfer");
        w_str(w, m->body.chunk_request.xfer);
        w_key(w, "missing");
        w_list(w, &m->body.chunk_request.missing);
        break;
    case FB_KIND_CREDIT:
        w_key(w, "xfer");
        w_str(w, m->body.credit.xfer);
        w_key(w, "upto");
        fb_mp_write_uint(w, m->body.credit.upto);
        break;
    default: break;
    }
}

int fb_wire_encode(const fb_msg *m, uint8_t *buf, size_t cap, size_t *out_len) {
    fb_mp_writer w;
    if (m->kind == FB_KIND_UNKNOWN) return FB_WIRE_EKIND;
    fb_mp_writer_init(&w, buf, cap);
    fb_wire_write(&w, m);
    if (out_len) *out_len = w.len;
    return w.overflow ? FB_WIRE_EOVERFLOW : FB_WIRE_OK;
}

/* ---- decoding ----------------------------------------------------------- */

typedef struct {
    fb_mp_reader r;
    int status; /* first FB_WIRE_* error besides malformed */
} dec;

static int bad(dec *d) {
    d->r.err = 1;
    return 0;
}

/* str with a length bound in characters (bytes for ASCII; UTF-8 counted as code points). */
static int d_str(dec *d, fb_str *out, uint32_t min_chars, uint32_t max_chars) {
    uint32_t i, chars = 0;
    if (!fb_mp_read_str(&d->r, &out->p, &out->n)) return 0;
    for (i = 0; i < out->n; i++)
        if (((uint8_t)out->p[i] & 0xc0) != 0x80) chars++;
    if (chars < min_chars || chars > max_chars) return bad(d);
    return 1;
}

static int d_uint(dec *d, uint64_t *out, uint64_t max) {
    if (!fb_mp_read_uint(&d->r, out)) return 0;
    if (*out > max) return bad(d);
    return 1;
}

static int d_table(dec *d, fb_table *t) {
    uint32_t n, k;
    if (!fb_mp_read_map(&d->r, &n)) return 0;
    if (n > 1024) return bad(d);
    t->count = 0;
    for (k = 0; k < n; k++) {
        fb_scalar s;
        memset(&s, 0, sizeof s);
        if (!d_str(d, &s.key, 0, 256)) return 0;
        switch (fb_mp_peek(&d->r)) {
        case FB_MP_INT:
        case FB_MP_UINT: {
            int big;
            if (!fb_mp_read_int(&d->r, &s.i, &s.u, &big)) return 0;
            s.type = big ? FB_SCALAR_UINT : FB_SCALAR_INT;
            break;
        }
        case FB_MP_FLOAT:
            if (!fb_mp_read_float(&d->r, &s.f, &s.f32)) return 0;
            s.type = FB_SCALAR_FLOAT;
            break;
        case FB_MP_BOOL:
            if (!fb_mp_read_bool(&d->r, &s.b)) return 0;
            s.type = FB_SCALAR_BOOL;
            break;
        case FB_MP_STR:
            if (!fb_mp_read_str(&d->r, &s.s.p, &s.s.n)) return 0;
            s.type = FB_SCALAR_STR;
            break;
        default: return bad(d);
        }
        if (t->count >= FB_MAX_TABLE) {
            d->status = FB_WIRE_ETOOBIG;
            return bad(d);
        }
        t->items[t->count++] = s;
    }
    return 1;
}

static int d_tensor(dec *d, fb_tensor *t) {
    uint32_t n, k, nd;
    int have_dtype = 0, have_shape = 0, have_data = 0;
    size_t item;
    uint64_t elems;
    if (!fb_mp_read_map(&d->r, &n)) return 0;
    for (k = 0; k < n; k++) {
        fb_str key;
        if (!fb_mp_read_str(&d->r, &key.p, &key.n)) return 0;
        if (fb_str_eq(key, "dtype")) {
            if (!fb_mp_read_str(&d->r, &t->dtype.p, &t->dtype.n)) return 0;
            have_dtype = 1;
        } else if (fb_str_eq(key, "shape")) {
            if (!fb_mp_read_array(&d->r, &nd)) return 0;
            if (nd > FB_MAX_DIMS) return bad(d);
            t->ndim = nd;
            for (nd = 0; nd < t->ndim; nd++)
                if (!fb_mp_read_uint(&d->r, &t->shape[nd])) return 0;
            have_shape = 1;
        } else if (fb_str_eq(key, "data")) {
            uint32_t len;
            if (!fb_mp_read_bin(&d->r, &t->data, &len)) return 0;
            t->nbytes = len;
            have_data = 1;
        } else if (!fb_mp_skip(&d->r)) {
            return 0;
        }
    }
    if (!have_dtype || !have_shape || !have_data) return bad(d);
    item = fb_dtype_size(t->dtype);
    if (!item) return bad(d);
    elems = 1;
    for (nd = 0; nd < t->ndim; nd++) {
        if (t->shape[nd] && elems > (UINT64_MAX / t->shape[nd])) return bad(d);
        elems *= t->shape[nd];
    }
    if (elems > (uint64_t)SIZE_MAX / item || elems * item != t->nbytes) return bad(d);
    t->host_f32 = NULL;
    return 1;
}

static int d_weights(dec *d, fb_weights *w) {
    uint32_t n, k;
    if (!fb_mp_read_map(&d->r, &n)) return 0;
    if (n > FB_MAX_TENSORS) {
        d->status = FB_WIRE_ETOOBIG;
        return bad(d);
    }
    w->count = 0;
    for (k = 0; k < n; k++) {
        fb_tensor *t = &w->items[w->count];
        memset(t, 0, sizeof *t);
        if (!d_str(d, &t->name, 0, 256)) return 0;
        if (!d_tensor(d, t)) return 0;
        w->count++;
    }
    return 1;
}

static int d_list(dec *d, fb_list *l, int of_str, uint32_t max_items, uint32_t max_chars) {
    size_t start = d->r.pos;
    uint32_t n, k;
    if (!fb_mp_read_array(&d->r, &n)) return 0;
    if (n > max_items) return bad(d);
    for (k = 0; k < n; k++) {
        if (of_str) {
            fb_str s;
            if (!d_str(d, &s, 0, max_chars)) return 0;
        } else {
            uint64_t u;
            if (!fb_mp_read_uint(&d->r, &u)) return 0;
        }
    }
    l->raw = d->r.buf + start;
    l->raw_len = d->r.pos - start;
    l->count = n;
    return 1;
}

static fb_kind kind_of(fb_str name) {
    int i;
    for (i = 1; i < NUM_KINDS; i++)
        if (fb_str_eq(name, KIND_NAMES[i])) return (fb_kind)i;
    return FB_KIND_UNKNOWN;
}

/* One body field; returns 1 when handled (or skipped as unknown), 0 on error. */
static int d_body_field(dec *d, fb_msg *m, fb_str key, uint32_t *seen) {
#define F(name, bit) (fb_str_eq(key, name) && ((*seen |= (1u << (bit))) != 0))
    switch (m->kind) {
    case FB_KIND_JOIN:
        if (F("role", 0)) return d_str(d, &m->body.join.role, 0, 256);
        if (F("num_examples", 1)) return d_uint(d, &m->body.join.num_examples, UINT64_MAX);
        if (F("capabilities", 2)) return d_table(d, &m->body.join.capabilities);
        break;
    case FB_KIND_LEAVE:
        if (F("reason", 0)) return d_str(d, &m->body.leave.reason, 0, 256);
        break;
    case FB_KIND_HEARTBEAT:
        if (F("status", 0)) return d_str(d, &m->body.heartbeat.status, 0, 256);
        if (F("metrics", 1)) return d_table(d, &m->body.heartbeat.metrics);
        break;
    case FB_KIND_MODEL:
        if (F("weights", 0)) return d_weights(d, &m->body.model.weights);
        if (F("encoding", 1)) return d_str(d, &m->body.model.encoding, 0, 256);
        if (F("config", 2)) return d_table(d, &m->body.model.config);
        if (F("selected", 3)) return d_list(d, &m->body.model.selected, 1, 1000000, 128);
        break;
    case FB_KIND_UPDATE:
        if (F("weights", 0)) return d_weights(d, &m->body.update.weights);
        if (F("num_examples", 1)) return d_uint(d, &m->body.update.num_examples, UINT64_MAX);
        if (F("encoding", 2)) return d_str(d, &m->body.update.encoding, 0, 256);
        if (F("reply_to", 3)) return d_str(d, &m->body.update.reply_to, 0, 128);
        if (F("metrics", 4)) return d_table(d, &m->body.update.metrics);
        break;
    case FB_KIND_UPDATE_FAILED:
        if (F("reason", 0)) return d_str(d, &m->body.update_failed.reason, 0, 256);
        if (F("reply_to", 1)) return d_str(d, &m->body.update_failed.reply_to, 0, 128);
        break;
    case FB_KIND_MANIFEST:
        if (F("state", 0)) return d_str(d, &m->body.manifest.state, 0, 256);
        if (F("attempt", 1)) return d_uint(d, &m->body.manifest.attempt, UINT64_MAX);
        if (F("completed_round", 2)) return d_uint(d, &m->body.manifest.completed_round, UINT64_MAX);
        if (F("rounds", 3)) return d_uint(d, &m->body.manifest.rounds, UINT64_MAX);
        if (F("model_id", 4)) return d_str(d, &m->body.manifest.model_id, 0, 128);
        if (F("selected", 5)) return d_list(d, &m->body.manifest.selected, 1, 1000000, 128);
        break;
    case FB_KIND_ACK:
        if (F("ref", 0)) return d_str(d, &m->body.ack.ref, 1, 128);
        if (F("status", 1)) {
            if (!d_str(d, &m->body.ack.status, 0, 256)) return 0;
            if (!fb_str_eq(m->body.ack.status, "ok") && !fb_str_eq(m->body.ack.status, "rejected")) return bad(d);
            return 1;
        }
        if (F("detail", 2)) return d_str(d, &m->body.ack.detail, 0, 256);
        break;
    case FB_KIND_CHUNK:
        if (F("xfer", 0)) return d_str(d, &m->body.chunk.xfer, 1, 128);
        if (F("index", 1)) return d_uint(d, &m->body.chunk.index, UINT64_MAX);
        if (F("count", 2)) return d_uint(d, &m->body.chunk.count, UINT64_MAX);
        if (F("size", 3)) return d_uint(d, &m->body.chunk.size, UINT64_MAX);
        if (F("digest", 4)) {
            uint32_t n;
            if (!fb_mp_read_bin(&d->r, &m->body.chunk.digest, &n)) return 0;
            if (n == 0) m->body.chunk.digest = NULL; /* allowed before the last chunk */
            return n == 32 || n == 0 ? 1 : bad(d);
        }
        if (F("crc", 5)) {
            uint64_t c;
            if (!d_uint(d, &c, 0xffffffffu)) return 0;
            m->body.chunk.crc = (uint32_t)c;
            return 1;
        }
        if (F("data", 6)) return fb_mp_read_bin(&d->r, &m->body.chunk.data, &m->body.chunk.data_len);
        break;
    case FB_KIND_CHUNK_REQUEST:
        if (F("xfer", 0)) return d_str(d, &m->body.chunk_request.xfer, 1, 128);
        if (F("missing", 1)) return d_list(d, &m->body.chunk_request.missing, 0, 65536, 0);
        break;
    case FB_KIND_CREDIT:
        if (F("xfer", 0)) return d_str(d, &m->body.credit.xfer, 1, 128);
        if (F("upto", 1)) return d_uint(d, &m->body.credit.upto, UINT64_MAX);
        break;
    default: break;
    }
#undef F
    return fb_mp_skip(&d->r); /* an unknown field: ignored (section 6) */
}

/* Required body fields per kind, as bit masks of d_body_field's bits. */
static uint32_t required_fields(fb_kind kind) {
    switch (kind) {
    case FB_KIND_MODEL: return 1u << 0;
    case FB_KIND_UPDATE: return 1u << 0;
    case FB_KIND_MANIFEST: return 1u << 0;
    case FB_KIND_ACK: return 1u << 0;
    case FB_KIND_CHUNK: return 0x7f;
    case FB_KIND_CHUNK_REQUEST: return 0x3;
    case FB_KIND_CREDIT: return 0x3;
    default: return 0;
    }
}

int fb_wire_decode(fb_msg *m, const uint8_t *payload, size_t len) {
    dec d;
    uint32_t n, k, seen = 0, env = 0;
    size_t body_start;
    fb_str kind_name = {0, 0};
    fb_mp_reader_init(&d.r, payload, len);
    d.status = FB_WIRE_OK;
    memset(m, 0, sizeof *m);
    if (!fb_mp_read_map(&d.r, &n)) return FB_WIRE_EMALFORMED;
    /* Pass 1: kind and v first (a v1 receiver reads nothing else before the version). */
    body_start = d.r.pos;
    for (k = 0; k < n; k++) {
        fb_str key;
        if (!fb_mp_read_str(&d.r, &key.p, &key.n)) return FB_WIRE_EMALFORMED;
        if (fb_str_eq(key, "kind")) {
            if (fb_mp_peek(&d.r) != FB_MP_STR || !fb_mp_read_str(&d.r, &kind_name.p, &kind_name.n))
                return FB_WIRE_EMALFORMED;
            env |= 1;
        } else if (fb_str_eq(key, "v")) {
            int64_t i;
            uint64_t u;
            int big;
            if (fb_mp_peek(&d.r) != FB_MP_INT && fb_mp_peek(&d.r) != FB_MP_UINT) return FB_WIRE_EMALFORMED;
            if (!fb_mp_read_int(&d.r, &i, &u, &big)) return FB_WIRE_EMALFORMED;
            m->v = big ? -1 : i;
            env |= 2;
        } else if (!fb_mp_skip(&d.r)) {
            return FB_WIRE_EMALFORMED;
        }
    }
    if (d.r.pos != len) return FB_WIRE_EMALFORMED; /* trailing bytes */
    if ((env & 3) != 3) return FB_WIRE_EMALFORMED;
    if (m->v != FB_WIRE_VERSION) return FB_WIRE_EVERSION;
    m->kind = kind_of(kind_name);
    if (m->kind == FB_KIND_UNKNOWN) return FB_WIRE_EKIND;
    {
        /* defaults, then pass 2 over every field */
        fb_kind kind = m->kind;
        int64_t v = m->v;
        fb_msg_init(m, kind, m->run, 0, m->sender, m->id);
        m->v = v;
    }
    d.r.pos = body_start;
    for (k = 0; k < n; k++) {
        fb_str key;
        if (!fb_mp_read_str(&d.r, &key.p, &key.n)) return FB_WIRE_EMALFORMED;
        if (fb_str_eq(key, "kind") || fb_str_eq(key, "v")) {
            if (!fb_mp_skip(&d.r)) return FB_WIRE_EMALFORMED;
        } else if (fb_str_eq(key, "run")) {
            if (!d_str(&d, &m->run, 1, 128)) break;
            env |= 4;
        } else if (fb_str_eq(key, "round")) {
            if (!d_uint(&d, &m->round, UINT64_MAX)) break;
        } else if (fb_str_eq(key, "sender")) {
            if (!d_str(&d, &m->sender, 1, 128)) break;
            env |= 8;
        } else if (fb_str_eq(key, "id")) {
            if (!d_str(&d, &m->id, 1, 128)) break;
            env |= 16;
        } else if (!d_body_field(&d, m, key, &seen)) {
            break;
        }
    }
    if (d.r.err) return d.status != FB_WIRE_OK ? d.status : FB_WIRE_EMALFORMED;
    if ((env & 31) != 31) return FB_WIRE_EMALFORMED;
    {
        uint32_t req = required_fields(m->kind);
        if ((seen & req) != req) return FB_WIRE_EMALFORMED;
    }
    if (m->kind == FB_KIND_CHUNK) {
        if (m->body.chunk.count < 1 || m->body.chunk.index >= m->body.chunk.count) return FB_WIRE_EMALFORMED;
        /* the last chunk must carry the chunk-table digest */
        if (!m->body.chunk.digest && m->body.chunk.index == m->body.chunk.count - 1) return FB_WIRE_EMALFORMED;
    }
    return FB_WIRE_OK;
}

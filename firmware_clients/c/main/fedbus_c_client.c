/*
 * fedbus-c-client: the host build of the fedbus firmware client.
 *
 *   fedbus-c-client --broker HOST:PORT --id ID --namespace NAME --data FILE.csv|FILE.bin
 *                   [--server server] [--prefix fedbus] [--max-payload-bytes 1000000]
 *                   [--timeout-s 0] [--rx-bytes N] [--quiet]
 *       joins the federation NAME as node ID and trains until the run finishes
 *       (exit 0), the timeout passes (exit 3) or the connection is lost (exit 1).
 *   fedbus-c-client --train-once MODEL.msgpack UPDATE.msgpack --data FILE
 *       answers one encoded `model` message offline (as if selected).
 *   fedbus-c-client --dump FILE.msgpack        prints the decoded message as JSON
 *   fedbus-c-client --reencode IN OUT          decodes IN and writes the canonical encoding
 *
 * Data files: CSV (one sample per line: features..., then the integer label)
 * or binary: "FBDS", uint32 n, uint32 features (little-endian), n*features
 * float32 little-endian, then n uint8 labels.
 * On exit the client prints one line "stats {...}" (JSON) with its counters.
 */
#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fb_chunk.h"
#include "fb_msgpack.h"
#include "fb_port_mqtt.h"
#include "fb_proto.h"
#include "fb_train.h"
#include "fb_wire.h"

static volatile sig_atomic_t g_stop = 0;
static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static int usage(void) {
    fprintf(stderr,
            "usage: fedbus-c-client --broker HOST:PORT --id ID --namespace NAME --data FILE.csv|FILE.bin\n"
            "                       [--server ID] [--prefix P] [--max-payload-bytes N] [--timeout-s S]\n"
            "                       [--rx-bytes N] [--quiet]\n"
            "       fedbus-c-client --train-once MODEL.msgpack UPDATE.msgpack --data FILE\n"
            "       fedbus-c-client --dump FILE.msgpack\n"
            "       fedbus-c-client --reencode IN.msgpack OUT.msgpack\n");
    return 2;
}

/* ---- files ---------------------------------------------------------------- */

static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    uint8_t *buf;
    long n;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return NULL;
    }
    buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static int write_file(const char *path, const uint8_t *data, size_t len) {
    FILE *f = fopen(path, "wb");
    int ok;
    if (!f) return -1;
    ok = fwrite(data, 1, len, f) == len;
    return fclose(f) == 0 && ok ? 0 : -1;
}

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static int load_data(const char *path, fb_dataset *d) {
    size_t len, i;
    uint8_t *raw = read_file(path, &len);
    float *x = NULL;
    uint8_t *y = NULL;
    if (!raw) return -1;
    if (len >= 12 && memcmp(raw, "FBDS", 4) == 0) {
        uint32_t n = le32(raw + 4), f = le32(raw + 8);
        if (f == 0 || len != 12 + (size_t)n * f * 4 + n) goto bad;
        x = malloc((size_t)n * f * sizeof(float) + 1);
        y = malloc((size_t)n + 1);
        if (!x || !y) goto bad;
        for (i = 0; i < (size_t)n * f; i++) x[i] = fb_get_f32le(raw + 12 + 4 * i);
        memcpy(y, raw + 12 + (size_t)n * f * 4, n);
        d->n = n;
        d->features = f;
    } else {
        /* CSV: count columns on the first line, then parse every line */
        size_t cap = 1024, n = 0, cols = 0, line_start;
        char *text = (char *)raw, *s, *end;
        text[len] = 0;
        for (s = text; *s && *s != '\n'; s++)
            if (*s == ',') cols++;
        cols++;
        if (cols < 2) goto bad;
        x = malloc(cap * (cols - 1) * sizeof(float));
        y = malloc(cap);
        if (!x || !y) goto bad;
        s = text;
        while (*s) {
            size_t c;
            while (*s == '\n' || *s == '\r' || *s == ' ') s++;
            if (!*s) break;
            if (n == cap) {
                float *nx;
                uint8_t *ny;
                cap *= 2;
                nx = realloc(x, cap * (cols - 1) * sizeof(float));
                if (nx) x = nx;
                ny = realloc(y, cap);
                if (ny) y = ny;
                if (!nx || !ny) goto bad;
            }
            line_start = n * (cols - 1);
            for (c = 0; c < cols; c++) {
                double v = strtod(s, &end);
                if (end == s) goto bad;
                if (c + 1 < cols)
                    x[line_start + c] = (float)v;
                else if (v < 0 || v > 255 || v != (double)(long)v)
                    goto bad;
                else
                    y[n] = (uint8_t)v;
                s = end;
                while (*s == ' ') s++;
                if (c + 1 < cols) {
                    if (*s != ',') goto bad;
                    s++;
                }
            }
            n++;
        }
        d->n = (uint32_t)n;
        d->features = (uint32_t)(cols - 1);
    }
    d->x = x;
    d->y = y;
    free(raw);
    return 0;
bad:
    free(raw);
    free(x);
    free(y);
    return -1;
}

/* ---- JSON dump (the shape of tests/golden/vectors.json "fields") ---------- */

static void j_str(fb_str s) {
    uint32_t i;
    putchar('"');
    for (i = 0; i < s.n; i++) {
        unsigned char c = (unsigned char)s.p[i];
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static void j_hex(const uint8_t *p, size_t n) {
    size_t i;
    putchar('"');
    for (i = 0; i < n; i++) printf("%02x", p[i]);
    putchar('"');
}

static void j_float(double v) {
    char buf[40];
    snprintf(buf, sizeof buf, "%.17g", v);
    if (!strpbrk(buf, ".en")) strcat(buf, ".0");
    fputs(buf, stdout);
}

static void j_table(const fb_table *t) {
    uint32_t i;
    putchar('{');
    for (i = 0; i < t->count; i++) {
        const fb_scalar *s = &t->items[i];
        if (i) fputs(", ", stdout);
        j_str(s->key);
        fputs(": ", stdout);
        switch (s->type) {
        case FB_SCALAR_INT: printf("%lld", (long long)s->i); break;
        case FB_SCALAR_UINT: printf("%llu", (unsigned long long)s->u); break;
        case FB_SCALAR_FLOAT: j_float(s->f); break;
        case FB_SCALAR_BOOL: fputs(s->b ? "true" : "false", stdout); break;
        case FB_SCALAR_STR: j_str(s->s); break;
        }
    }
    putchar('}');
}

static void j_weights(const fb_weights *w) {
    uint32_t i, d;
    putchar('{');
    for (i = 0; i < w->count; i++) {
        const fb_tensor *t = &w->items[i];
        if (i) fputs(", ", stdout);
        j_str(t->name);
        fputs(": {\"$tensor\": {\"dtype\": ", stdout);
        j_str(t->dtype);
        fputs(", \"shape\": [", stdout);
        for (d = 0; d < t->ndim; d++) printf("%s%llu", d ? ", " : "", (unsigned long long)t->shape[d]);
        fputs("], \"data_hex\": ", stdout);
        j_hex(t->data, t->nbytes);
        fputs("}}", stdout);
    }
    putchar('}');
}

static void j_list(const fb_list *l, int of_str) {
    fb_list_iter it;
    fb_str s;
    uint64_t u;
    int first = 1;
    putchar('[');
    fb_list_begin(&it, l);
    if (of_str) {
        while (fb_list_next_str(&it, &s)) {
            if (!first) fputs(", ", stdout);
            first = 0;
            j_str(s);
        }
    } else {
        while (fb_list_next_uint(&it, &u)) {
            printf("%s%llu", first ? "" : ", ", (unsigned long long)u);
            first = 0;
        }
    }
    putchar(']');
}

#define K(name) fputs(", \"" name "\": ", stdout)

static void dump(const fb_msg *m) {
    printf("{\"kind\": \"%s\", \"v\": %lld", fb_kind_name(m->kind), (long long)m->v);
    K("run");
    j_str(m->run);
    K("round");
    printf("%llu", (unsigned long long)m->round);
    K("sender");
    j_str(m->sender);
    K("id");
    j_str(m->id);
    switch (m->kind) {
    case FB_KIND_JOIN:
        K("role");
        j_str(m->body.join.role);
        K("num_examples");
        printf("%llu", (unsigned long long)m->body.join.num_examples);
        K("capabilities");
        j_table(&m->body.join.capabilities);
        break;
    case FB_KIND_LEAVE:
        K("reason");
        j_str(m->body.leave.reason);
        break;
    case FB_KIND_HEARTBEAT:
        K("status");
        j_str(m->body.heartbeat.status);
        K("metrics");
        j_table(&m->body.heartbeat.metrics);
        break;
    case FB_KIND_MODEL:
        K("weights");
        j_weights(&m->body.model.weights);
        K("encoding");
        j_str(m->body.model.encoding);
        K("config");
        j_table(&m->body.model.config);
        K("selected");
        j_list(&m->body.model.selected, 1);
        break;
    case FB_KIND_UPDATE:
        K("weights");
        j_weights(&m->body.update.weights);
        K("num_examples");
        printf("%llu", (unsigned long long)m->body.update.num_examples);
        K("encoding");
        j_str(m->body.update.encoding);
        K("reply_to");
        j_str(m->body.update.reply_to);
        K("metrics");
        j_table(&m->body.update.metrics);
        break;
    case FB_KIND_UPDATE_FAILED:
        K("reason");
        j_str(m->body.update_failed.reason);
        K("reply_to");
        j_str(m->body.update_failed.reply_to);
        break;
    case FB_KIND_MANIFEST:
        K("state");
        j_str(m->body.manifest.state);
        K("attempt");
        printf("%llu", (unsigned long long)m->body.manifest.attempt);
        K("completed_round");
        printf("%llu", (unsigned long long)m->body.manifest.completed_round);
        K("rounds");
        printf("%llu", (unsigned long long)m->body.manifest.rounds);
        K("model_id");
        j_str(m->body.manifest.model_id);
        K("selected");
        j_list(&m->body.manifest.selected, 1);
        break;
    case FB_KIND_ACK:
        K("ref");
        j_str(m->body.ack.ref);
        K("status");
        j_str(m->body.ack.status);
        K("detail");
        j_str(m->body.ack.detail);
        break;
    case FB_KIND_CHUNK:
        K("xfer");
        j_str(m->body.chunk.xfer);
        K("index");
        printf("%llu", (unsigned long long)m->body.chunk.index);
        K("count");
        printf("%llu", (unsigned long long)m->body.chunk.count);
        K("size");
        printf("%llu", (unsigned long long)m->body.chunk.size);
        K("digest");
        fputs("{\"$bin\": ", stdout);
        j_hex(m->body.chunk.digest, m->body.chunk.digest ? 32 : 0);
        putchar('}');
        K("crc");
        printf("%lu", (unsigned long)m->body.chunk.crc);
        K("data");
        fputs("{\"$bin\": ", stdout);
        j_hex(m->body.chunk.data, m->body.chunk.data_len);
        putchar('}');
        break;
    case FB_KIND_CHUNK_REQUEST:
        K("xfer");
        j_str(m->body.chunk_request.xfer);
        K("missing");
        j_list(&m->body.chunk_request.missing, 0);
        break;
    case FB_KIND_CREDIT:
        K("xfer");
        j_str(m->body.credit.xfer);
        K("upto");
        printf("%llu", (unsigned long long)m->body.credit.upto);
        break;
    default: break;
    }
    puts("}");
}

/* ---- the network client ----------------------------------------------------- */

typedef struct {
    fb_mqtt *mqtt;
    fb_proto *proto;
    int quiet;
    const char *id;
} host_ctx;

static int host_publish(void *ctx, const char *topic, const uint8_t *payload, size_t len, int retain) {
    host_ctx *h = ctx;
    return fb_mqtt_publish(h->mqtt, topic, payload, len, 1, retain);
}

static void host_log(void *ctx, const char *line) {
    host_ctx *h = ctx;
    if (!h->quiet) fprintf(stderr, "fedbus-c-client %s: %s\n", h->id, line);
}

static void host_on_message(void *user, const char *topic, const uint8_t *payload, size_t len) {
    host_ctx *h = user;
    fb_proto_on_message(h->proto, topic, payload, len, fb_port_now_ms());
}

static void print_stats(const fb_proto *p) {
    const fb_proto_stats *s = &p->stats;
    printf("stats {\"received\": %u, \"dropped\": %u, \"duplicates\": %u, \"chunks_received\": %u, "
           "\"chunks_sent\": %u, \"chunks_resent\": %u, \"chunk_requests_sent\": %u, "
           "\"chunk_requests_received\": %u, \"credits_received\": %u, \"credits_sent\": %u, "
           "\"transfers_completed\": %u, \"probes_sent\": %u, \"joins_sent\": %u, \"updates_sent\": %u, "
           "\"failures_sent\": %u, \"rounds_trained\": %u, \"evaluations\": %u}\n",
           s->received, s->dropped, s->duplicates, s->chunks_received, s->chunks_sent, s->chunks_resent,
           s->chunk_requests_sent, s->chunk_requests_received, s->credits_received, s->credits_sent,
           s->transfers_completed, s->probes_sent, s->joins_sent, s->updates_sent, s->failures_sent,
           s->rounds_trained, s->evaluations);
    fflush(stdout);
}

typedef struct {
    const char *broker, *id, *ns, *server, *prefix, *data;
    size_t max_payload, rx_bytes;
    double timeout_s;
    int quiet;
} options;

static fb_proto g_proto; /* large: keep it off the stack */

static int alloc_config(fb_proto_config *cfg, const options *o, fb_dataset *data) {
    size_t weights = 1u << 16; /* floats: up to 64k parameters */
    memset(cfg, 0, sizeof *cfg);
    cfg->node_id = o->id;
    cfg->namespace_ = o->ns;
    cfg->server_id = o->server;
    cfg->prefix = o->prefix;
    cfg->max_payload_bytes = o->max_payload;
    cfg->rx_cap = o->rx_bytes;
    cfg->rx_max_chunks = (uint32_t)(o->rx_bytes / 64 + 1);
    cfg->tx_cap = weights * 4 + 65536;
    cfg->msg_cap = o->max_payload;
    cfg->weights_cap = weights;
    cfg->work_cap = weights + 1024;
    cfg->rx_buf = malloc(cfg->rx_cap);
    cfg->rx_bitmap = malloc(cfg->rx_max_chunks / 8 + 1);
    cfg->tx_buf = malloc(cfg->tx_cap);
    cfg->msg_buf = malloc(cfg->msg_cap);
    cfg->weights = malloc(cfg->weights_cap * sizeof(float));
    cfg->work = malloc(cfg->work_cap * sizeof(float));
    cfg->data = data;
    return cfg->rx_buf && cfg->rx_bitmap && cfg->tx_buf && cfg->msg_buf && cfg->weights && cfg->work ? 0 : -1;
}

static int run_client(const options *o, fb_dataset *data) {
    fb_proto_config cfg;
    host_ctx h;
    fb_mqtt_config mc;
    char host[256], will_topic[FB_TOPIC_MAX], t1[FB_TOPIC_MAX], t2[FB_TOPIC_MAX], t3[FB_TOPIC_MAX];
    uint8_t will[512];
    size_t will_len;
    const char *colon = strrchr(o->broker, ':');
    uint64_t deadline, last_tick = 0;
    int rc = 0;
    if (!colon || (size_t)(colon - o->broker) >= sizeof host) return usage();
    memcpy(host, o->broker, (size_t)(colon - o->broker));
    host[colon - o->broker] = 0;
    if (alloc_config(&cfg, o, data) != 0) {
        fprintf(stderr, "fedbus-c-client: out of memory\n");
        return 1;
    }
    memset(&h, 0, sizeof h);
    h.proto = &g_proto;
    h.quiet = o->quiet;
    h.id = o->id;
    cfg.publish = host_publish;
    cfg.publish_ctx = &h;
    cfg.log = host_log;
    cfg.log_ctx = &h;
    cfg.seed = (uint32_t)fb_port_now_ms() ^ (uint32_t)getpid();
    if (fb_proto_init(&g_proto, &cfg) != 0) {
        fprintf(stderr, "fedbus-c-client: bad settings (max payload >= 1024 bytes?)\n");
        return 2;
    }
    fb_proto_will(&g_proto, will_topic, will, sizeof will, &will_len);
    memset(&mc, 0, sizeof mc);
    mc.host = host;
    mc.port = atoi(colon + 1);
    mc.client_id = o->id;
    mc.keepalive_s = 30;
    mc.will_topic = will_topic;
    mc.will_payload = will;
    mc.will_len = will_len;
    h.mqtt = fb_mqtt_connect(&mc, host_on_message, &h);
    if (!h.mqtt) {
        fprintf(stderr, "fedbus-c-client %s: cannot connect to %s\n", o->id, o->broker);
        return 1;
    }
    fb_proto_subscriptions(&g_proto, t1, t2, t3);
    if (fb_mqtt_subscribe(h.mqtt, t3, 1) || fb_mqtt_subscribe(h.mqtt, t1, 1) || fb_mqtt_subscribe(h.mqtt, t2, 1)) {
        fprintf(stderr, "fedbus-c-client %s: subscribe failed\n", o->id);
        fb_mqtt_abort(h.mqtt);
        return 1;
    }
    host_log(&h, "waiting for a run");
    deadline = o->timeout_s > 0 ? fb_port_now_ms() + (uint64_t)(o->timeout_s * 1000) : 0;
    while (!fb_proto_done(&g_proto)) {
        uint64_t now;
        if (g_stop) {
            rc = 130;
            break;
        }
        if (fb_mqtt_loop(h.mqtt, 50) != 0) {
            fprintf(stderr, "fedbus-c-client %s: connection lost\n", o->id);
            print_stats(&g_proto);
            fb_mqtt_abort(h.mqtt);
            return 1;
        }
        now = fb_port_now_ms();
        if (now - last_tick >= 100) {
            fb_proto_tick(&g_proto, now);
            last_tick = now;
        }
        if (deadline && now > deadline) {
            fprintf(stderr, "fedbus-c-client %s: timeout\n", o->id);
            rc = 3;
            break;
        }
    }
    print_stats(&g_proto);
    if (rc == 0) {
        host_log(&h, "the run finished");
        fb_mqtt_disconnect(h.mqtt);
    } else {
        fb_mqtt_abort(h.mqtt); /* the will tells the server */
    }
    return rc;
}

/* ---- offline modes ------------------------------------------------------------ */

static int train_once(const char *in, const char *out, const options *o, fb_dataset *data) {
    fb_proto_config cfg;
    size_t len, out_len;
    uint8_t *model = read_file(in, &len);
    int rc;
    options oo = *o;
    if (!model) {
        fprintf(stderr, "cannot read %s\n", in);
        return 1;
    }
    oo.id = o->id ? o->id : "offline";
    oo.ns = o->ns ? o->ns : "offline";
    if (alloc_config(&cfg, &oo, data) != 0 || fb_proto_init(&g_proto, &cfg) != 0) return 1;
    rc = fb_proto_train_once(&g_proto, model, len, cfg.tx_buf, cfg.tx_cap, &out_len);
    if (rc != FB_WIRE_OK) {
        fprintf(stderr, "train-once failed: error %d\n", rc);
        return 1;
    }
    if (write_file(out, cfg.tx_buf, out_len) != 0) return 1;
    print_stats(&g_proto);
    return 0;
}

static int dump_file(const char *path) {
    size_t len;
    uint8_t *buf = read_file(path, &len);
    static fb_msg m;
    int rc;
    if (!buf) return 1;
    rc = fb_wire_decode(&m, buf, len);
    if (rc != FB_WIRE_OK) {
        fprintf(stderr, "%s: decode error %d\n", path, rc);
        return 1;
    }
    dump(&m);
    return 0;
}

static int reencode(const char *in, const char *out) {
    size_t len, n;
    uint8_t *buf = read_file(in, &len), *enc;
    static fb_msg m;
    if (!buf || fb_wire_decode(&m, buf, len) != FB_WIRE_OK) return 1;
    fb_wire_encode(&m, NULL, 0, &n);
    enc = malloc(n + 1);
    if (!enc || fb_wire_encode(&m, enc, n, &n) != FB_WIRE_OK) return 1;
    return write_file(out, enc, n) == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    options o;
    fb_dataset data;
    const char *train_in = NULL, *train_out = NULL;
    int i;
    memset(&o, 0, sizeof o);
    memset(&data, 0, sizeof data);
    o.server = "server";
    o.prefix = "fedbus";
    o.max_payload = 1000000;
    o.rx_bytes = 4u << 20;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--dump") == 0 && v) return dump_file(v);
        if (strcmp(a, "--reencode") == 0 && v && i + 2 < argc) return reencode(v, argv[i + 2]);
        if (strcmp(a, "--quiet") == 0) {
            o.quiet = 1;
            continue;
        }
        if (!v) return usage();
        if (strcmp(a, "--broker") == 0) o.broker = v;
        else if (strcmp(a, "--id") == 0) o.id = v;
        else if (strcmp(a, "--namespace") == 0) o.ns = v;
        else if (strcmp(a, "--server") == 0) o.server = v;
        else if (strcmp(a, "--prefix") == 0) o.prefix = v;
        else if (strcmp(a, "--data") == 0) o.data = v;
        else if (strcmp(a, "--max-payload-bytes") == 0) o.max_payload = (size_t)strtoul(v, NULL, 10);
        else if (strcmp(a, "--rx-bytes") == 0) o.rx_bytes = (size_t)strtoul(v, NULL, 10);
        else if (strcmp(a, "--timeout-s") == 0) o.timeout_s = strtod(v, NULL);
        else if (strcmp(a, "--train-once") == 0 && i + 2 < argc) {
            train_in = v;
            train_out = argv[i + 2];
            i++;
        } else
            return usage();
        i++;
    }
    if (!o.data || load_data(o.data, &data) != 0) {
        fprintf(stderr, "fedbus-c-client: cannot load data file %s\n", o.data ? o.data : "(none: pass --data)");
        return 2;
    }
    if (train_in) return train_once(train_in, train_out, &o, &data);
    if (!o.broker || !o.id || !o.ns) return usage();
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    return run_client(&o, &data);
}

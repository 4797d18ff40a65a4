/* fb_proto: see fb_proto.h. */
#include "fb_proto.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define JOIN_ATTEMPTS 8
#define JOIN_BACKOFF_MS 500u
#define JOIN_BACKOFF_MAX_MS 8000u
#define REQUEST_GAP_MS 1000u
#define MAX_REQUESTS 5u
#define TRANSFER_TIMEOUT_MS 60000u
#define CREDIT_TIMEOUT_MS 60000u
#define MAX_MISSING_PER_REQUEST 128u

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static void logf_(fb_proto *p, const char *fmt, ...) {
    char line[256];
    va_list ap;
    if (!p->cfg.log) return;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    p->cfg.log(p->cfg.log_ctx, line);
}

static void copy_fb(char *dst, size_t cap, fb_str s) {
    size_t n = s.n < cap - 1 ? s.n : cap - 1;
    memcpy(dst, s.p, n);
    dst[n] = 0;
}

/* ---- ids and topics ------------------------------------------------------- */

static uint64_t next_rand(fb_proto *p) {
    /* xorshift64*: message ids need uniqueness per sender and run, not secrecy */
    uint64_t x = p->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    p->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static void new_id(fb_proto *p, char out[17]) {
    static const char HEX[] = "0123456789abcdef";
    uint64_t r = next_rand(p);
    int i;
    for (i = 0; i < 16; i++) out[i] = HEX[(r >> (4 * i)) & 15];
    out[16] = 0;
}

static void topic_out(const fb_proto *p, char out[FB_TOPIC_MAX], const char *sender, const char *channel) {
    snprintf(out, FB_TOPIC_MAX, "%s/%s/out/%s/%s", p->cfg.prefix, p->cfg.namespace_, sender, channel);
}

static void topic_to(const fb_proto *p, char out[FB_TOPIC_MAX], const char *recipient) {
    snprintf(out, FB_TOPIC_MAX, "%s/%s/to/%s/%s", p->cfg.prefix, p->cfg.namespace_, recipient, p->cfg.node_id);
}

void fb_proto_subscriptions(const fb_proto *p, char manifest[FB_TOPIC_MAX], char model[FB_TOPIC_MAX],
                            char inbox[FB_TOPIC_MAX]) {
    topic_out(p, manifest, p->cfg.server_id, "manifest");
    topic_out(p, model, p->cfg.server_id, "model");
    snprintf(inbox, FB_TOPIC_MAX, "%s/%s/to/%s/+", p->cfg.prefix, p->cfg.namespace_, p->cfg.node_id);
}

/* Parsed topic: form 'o' (out: sender, channel) or 't' (to us: sender). */
typedef struct {
    char form;
    char sender[65];
    char channel[65];
} topic_info;

static int level(const char **s, char *out, size_t cap) {
    const char *slash = strchr(*s, '/');
    size_t n = slash ? (size_t)(slash - *s) : strlen(*s);
    if (n == 0 || n >= cap) return 0;
    memcpy(out, *s, n);
    out[n] = 0;
    *s += n + (slash ? 1 : 0);
    return slash != NULL ? 1 : 2; /* 2: this was the last level */
}

static int parse_topic(const fb_proto *p, const char *topic, topic_info *t) {
    size_t lp = strlen(p->cfg.prefix), ln = strlen(p->cfg.namespace_);
    char form[8], a[65];
    const char *s = topic;
    if (strncmp(s, p->cfg.prefix, lp) != 0 || s[lp] != '/') return 0;
    s += lp + 1;
    if (strncmp(s, p->cfg.namespace_, ln) != 0 || s[ln] != '/') return 0;
    s += ln + 1;
    if (level(&s, form, sizeof form) != 1) return 0;
    if (level(&s, a, sizeof a) != 1) return 0;
    if (strcmp(form, "out") == 0) {
        t->form = 'o';
        strcpy(t->sender, a);
        return level(&s, t->channel, sizeof t->channel) == 2;
    }
    if (strcmp(form, "to") == 0) {
        t->form = 't';
        if (strcmp(a, p->cfg.node_id) != 0) return 0; /* another node's inbox */
        t->channel[0] = 0;
        return level(&s, t->sender, sizeof t->sender) == 2;
    }
    return 0;
}

/* ---- sending -------------------------------------------------------------- */

static int publish(fb_proto *p, const char *topic, const uint8_t *payload, size_t len, int retain) {
    return p->cfg.publish(p->cfg.publish_ctx, topic, payload, len, retain);
}

static size_t chunk_room(const fb_proto *p, const char *topic) {
    /* resends may go to a requester's inbox: size chunks for a 64-character recipient too */
    size_t worst = strlen(p->cfg.prefix) + strlen(p->cfg.namespace_) + strlen(p->cfg.node_id) + 64 + 6;
    size_t tl = strlen(topic) > worst ? strlen(topic) : worst;
    return fb_chunk_max_data(p->cfg.max_payload_bytes, tl, strlen(p->cfg.namespace_), strlen(p->cfg.node_id), 16,
                             p->tx_round);
}

static int send_tx_chunk(fb_proto *p, uint32_t index) {
    char id[17];
    size_t len;
    new_id(p, id);
    fb_msg_init(&p->out, FB_KIND_CHUNK, fb_s(p->cfg.namespace_), p->tx_round, fb_s(p->cfg.node_id), fb_s(id));
    fb_tx_chunk(&p->tx, index, &p->out);
    if (fb_wire_encode(&p->out, p->cfg.msg_buf, p->cfg.msg_cap, &len) != FB_WIRE_OK) return -1;
    if (publish(p, p->tx_topic, p->cfg.msg_buf, len, 0) != 0) return -1;
    p->stats.chunks_sent++;
    return 0;
}

static void pump_tx(fb_proto *p) {
    int64_t i;
    if (!p->tx_active) return;
    while ((i = fb_tx_next(&p->tx)) >= 0) send_tx_chunk(p, (uint32_t)i);
    if (p->tx.next_index >= p->tx.count) {
        p->stats.transfers_completed++;
        /* keep tx_buf and the transfer for chunk requests until the next update */
        p->tx_active = 0;
    }
}

/* Send p->out to `recipient`, chunked with credits when it does not fit one packet. */
static int send_directed(fb_proto *p, const char *recipient) {
    char topic[FB_TOPIC_MAX];
    size_t len;
    int rc;
    topic_to(p, topic, recipient);
    p->tx.count = 0; /* tx_buf is overwritten: the previous transfer can no longer be resent */
    p->tx_active = 0;
    rc = fb_wire_encode(&p->out, p->cfg.tx_buf, p->cfg.tx_cap, &len);
    if (rc != FB_WIRE_OK) {
        snprintf(p->last_error, sizeof p->last_error, "message of %zu bytes exceeds tx_buf", len);
        return rc;
    }
    if (fb_packet_overhead(strlen(topic)) + len <= p->cfg.max_payload_bytes) return publish(p, topic, p->cfg.tx_buf, len, 0);
    {
        char xfer[17];
        size_t room;
        p->tx_round = p->out.round;
        room = chunk_room(p, topic);
        if (room == 0) return -1;
        new_id(p, xfer);
        fb_tx_init(&p->tx, p->cfg.tx_buf, len, room, xfer);
        memcpy(p->tx_topic, topic, sizeof topic);
        p->tx_len = len;
        p->tx_active = 1;
        p->tx_last_ms = p->now_ms;
        logf_(p, "sending %s in %lu chunks", fb_kind_name(p->out.kind), (unsigned long)p->tx.count);
        pump_tx(p); /* chunk 0, unsolicited */
    }
    return 0;
}

/* A small control message (join, credit, chunk request) via msg_buf. */
static int send_small(fb_proto *p, const char *recipient) {
    char topic[FB_TOPIC_MAX];
    size_t len;
    topic_to(p, topic, recipient);
    if (fb_wire_encode(&p->out, p->cfg.msg_buf, p->cfg.msg_cap, &len) != FB_WIRE_OK) return -1;
    return publish(p, topic, p->cfg.msg_buf, len, 0);
}

static void send_join(fb_proto *p) {
    new_id(p, p->join_id);
    fb_msg_init(&p->out, FB_KIND_JOIN, fb_s(p->run), 0, fb_s(p->cfg.node_id), fb_s(p->join_id));
    p->out.body.join.num_examples = p->cfg.data ? p->cfg.data->n : 0;
    fb_table_add_int(&p->out.body.join.capabilities, "max_payload_bytes", (int64_t)p->cfg.max_payload_bytes);
    fb_table_add_str(&p->out.body.join.capabilities, "dtype", "float32");
    fb_table_add_str(&p->out.body.join.capabilities, "firmware", "c");
    if (send_small(p, p->cfg.server_id) == 0) p->stats.joins_sent++;
    p->join_attempts++;
    p->next_join_ms = p->now_ms + p->join_backoff_ms;
    p->join_backoff_ms = p->join_backoff_ms * 2 > JOIN_BACKOFF_MAX_MS ? JOIN_BACKOFF_MAX_MS : p->join_backoff_ms * 2;
}

/* ---- local work ------------------------------------------------------------ */

/* Load the model's weights into cfg.weights; returns NULL or a failure reason. */
static const char *load_model(fb_proto *p, const fb_msg *model, fb_logreg *m, const fb_tensor **tw,
                              const fb_tensor **tb) {
    const fb_weights *ws = &model->body.model.weights;
    uint64_t k;
    *tw = fb_weights_get(ws, "dense0.w");
    *tb = fb_weights_get(ws, "dense0.b");
    if (!fb_str_eq(model->body.model.encoding, "dense")) return "unsupported encoding";
    if (ws->count != 2 || !*tw || !*tb) return "unsupported model: expected logistic regression (dense0.w, dense0.b)";
    if (!fb_str_eq((*tw)->dtype, "float32") || !fb_str_eq((*tb)->dtype, "float32") || (*tw)->ndim != 2 ||
        (*tb)->ndim != 1 || (*tw)->shape[1] != (*tb)->shape[0] || (*tw)->shape[1] < 2)
        return "unsupported model: expected float32 dense0.w [in, out] and dense0.b [out]";
    if (!p->cfg.data || (*tw)->shape[0] != p->cfg.data->features) return "the model's input width differs from the data";
    m->in = (uint32_t)(*tw)->shape[0];
    m->out = (uint32_t)(*tw)->shape[1];
    if ((size_t)m->in * m->out + m->out > p->cfg.weights_cap ||
        fb_train_scratch_bytes(m->in, m->out) > p->cfg.work_cap * sizeof(float))
        return "out of memory";
    m->w = p->cfg.weights;
    m->b = p->cfg.weights + (size_t)m->in * m->out;
    for (k = 0; k < (uint64_t)m->in * m->out; k++) m->w[k] = fb_get_f32le((*tw)->data + 4 * k);
    for (k = 0; k < m->out; k++) m->b[k] = fb_get_f32le((*tb)->data + 4 * k);
    return NULL;
}

static const char *STR_TASK_EVALUATE = "evaluate";

/* Build the answer to `model` in p->out (update or update_failed). ids must outlive the send. */
static void answer_model(fb_proto *p, const fb_msg *model, char id[17]) {
    fb_logreg m;
    const fb_tensor *tw, *tb;
    const fb_table *config = &model->body.model.config;
    const fb_scalar *task = fb_table_get(config, "task");
    const fb_scalar *evaluate = fb_table_get(config, "evaluate");
    int eval_only = task && task->type == FB_SCALAR_STR && fb_str_eq(task->s, STR_TASK_EVALUATE);
    int eval_first = eval_only || (evaluate && evaluate->type == FB_SCALAR_BOOL && evaluate->b);
    const char *why = load_model(p, model, &m, &tw, &tb);
    double eval_loss = 0, eval_acc = 0;
    new_id(p, id);
    if (why) {
        fb_msg_init(&p->out, FB_KIND_UPDATE_FAILED, model->run, model->round, fb_s(p->cfg.node_id), fb_s(id));
        p->out.body.update_failed.reason = fb_s(why);
        p->out.body.update_failed.reply_to = model->id;
        logf_(p, "cannot train: %s (round %llu)", why, (unsigned long long)model->round);
        return;
    }
    fb_msg_init(&p->out, FB_KIND_UPDATE, model->run, model->round, fb_s(p->cfg.node_id), fb_s(id));
    p->out.body.update.reply_to = model->id;
    if (eval_first) {
        fb_train_evaluate(&m, p->cfg.data, p->cfg.work, &eval_loss, &eval_acc);
        p->stats.evaluations++;
    }
    if (!eval_only) {
        fb_fit_config fit;
        double train_loss = 0, epochs = 1, lr = 0.05, mu = 0;
        float *grad_w = p->cfg.work, *grad_b = grad_w + (size_t)m.in * m.out, *scratch = grad_b + m.out;
        fb_table_number(config, "epochs", &epochs);
        fb_table_number(config, "lr", &lr);
        fb_table_number(config, "mu", &mu);
        memset(&fit, 0, sizeof fit);
        fit.epochs = epochs < 0 ? 0 : (uint32_t)epochs;
        fit.lr = (float)lr;
        fit.mu = (float)mu;
        fit.anchor_w_le = tw->data;
        fit.anchor_b_le = tb->data;
        if (fb_train_fit(&m, p->cfg.data, &fit, grad_w, grad_b, scratch, &train_loss) != 0) {
            fb_msg_init(&p->out, FB_KIND_UPDATE_FAILED, model->run, model->round, fb_s(p->cfg.node_id), fb_s(id));
            p->out.body.update_failed.reason = fb_s("bad local data (labels out of range, or none)");
            p->out.body.update_failed.reply_to = model->id;
            return;
        }
        p->stats.rounds_trained++;
        {
            fb_weights *ws = &p->out.body.update.weights;
            fb_tensor *t = &ws->items[0];
            ws->count = 2;
            t->name = fb_s("dense0.w");
            t->dtype = fb_s("float32");
            t->ndim = 2;
            t->shape[0] = m.in;
            t->shape[1] = m.out;
            t->host_f32 = m.w;
            t->nbytes = (size_t)m.in * m.out * 4;
            t = &ws->items[1];
            t->name = fb_s("dense0.b");
            t->dtype = fb_s("float32");
            t->ndim = 1;
            t->shape[0] = m.out;
            t->host_f32 = m.b;
            t->nbytes = (size_t)m.out * 4;
        }
        p->out.body.update.num_examples = p->cfg.data->n;
        if (fit.epochs) fb_table_add_float(&p->out.body.update.metrics, "train_loss", train_loss);
    }
    if (eval_first) {
        fb_table *mt = &p->out.body.update.metrics;
        fb_table_add_float(mt, "eval_num_examples", (double)p->cfg.data->n);
        fb_table_add_float(mt, "eval_accuracy", eval_acc);
        fb_table_add_float(mt, "eval_loss", eval_loss);
    }
}

/* ---- receiving ------------------------------------------------------------ */

static uint32_t fnv(fb_str a, fb_str b) {
    uint32_t h = 2166136261u, i;
    for (i = 0; i < a.n; i++) h = (h ^ (uint8_t)a.p[i]) * 16777619u;
    h = (h ^ 0xffu) * 16777619u;
    for (i = 0; i < b.n; i++) h = (h ^ (uint8_t)b.p[i]) * 16777619u;
    return h | 1u;
}

static int seen_recently(fb_proto *p, fb_str sender, fb_str id) {
    uint32_t h = fnv(sender, id), i;
    for (i = 0; i < 64; i++)
        if (p->recent[i] == h) return 1;
    p->recent[p->recent_next] = h;
    p->recent_next = (p->recent_next + 1) % 64;
    return 0;
}

static void new_session(fb_proto *p, fb_str run) {
    copy_fb(p->run, sizeof p->run, run);
    p->round = 0;
    p->acted = 0;
    p->confirmed = 0;
    p->tx_active = 0;
    p->state = FB_STATE_JOINING;
    p->join_attempts = 0;
    p->join_backoff_ms = JOIN_BACKOFF_MS;
    logf_(p, "run %s: joining", p->run);
    send_join(p);
}

static void on_manifest(fb_proto *p, const fb_msg *m) {
    fb_str me = fb_s(p->cfg.node_id);
    int finished = fb_str_eq(m->body.manifest.state, "finished");
    if (p->state == FB_STATE_DONE) return;
    if (!p->run[0] || !fb_str_eq(m->run, p->run)) {
        if (finished) return; /* a run we never took part in ended: wait for the next */
        new_session(p, m->run);
    }
    if (fb_list_contains(&m->body.manifest.selected, me)) p->confirmed = 1;
    if (m->round > p->round) p->round = m->round;
    if (finished) {
        p->state = FB_STATE_DONE;
        logf_(p, "%s: the run finished at round %llu", p->run, (unsigned long long)m->round);
    }
}

static void on_model(fb_proto *p, const fb_msg *m) {
    char id[17];
    fb_str me = fb_s(p->cfg.node_id);
    fb_kind kind;
    int selected;
    if (p->state == FB_STATE_DONE || !p->run[0] || !fb_str_eq(m->run, p->run)) return;
    /* Only being named confirms the join; ["*"] selects every node the server
     * counts as live (wire format 5, `model`), which this node may not yet be. */
    selected = fb_list_contains(&m->body.model.selected, me);
    if (selected) p->confirmed = 1;
    selected = selected || fb_list_contains(&m->body.model.selected, fb_s("*"));
    if (m->round < p->round) return;
    p->round = m->round;
    if (!selected || p->acted >= m->round) return;
    p->acted = m->round;
    answer_model(p, m, id);
    kind = p->out.kind; /* p->out is reused for the chunks */
    if (send_directed(p, p->cfg.server_id) == 0) {
        if (kind == FB_KIND_UPDATE)
            p->stats.updates_sent++;
        else
            p->stats.failures_sent++;
        logf_(p, "%s sent for round %llu", fb_kind_name(kind), (unsigned long long)m->round);
    }
}

static void send_credit(fb_proto *p, fb_str xfer, uint64_t upto, const char *to) {
    char id[17];
    new_id(p, id);
    fb_msg_init(&p->out, FB_KIND_CREDIT, fb_s(p->cfg.namespace_), 0, fb_s(p->cfg.node_id), fb_s(id));
    p->out.body.credit.xfer = xfer;
    p->out.body.credit.upto = upto;
    if (send_small(p, to) == 0) p->stats.credits_sent++;
}

static void dispatch(fb_proto *p, const topic_info *t, fb_msg *m);

static void on_chunk(fb_proto *p, const topic_info *t, fb_msg *m) {
    fb_rx_status st;
    p->stats.chunks_received++;
    st = fb_rx_feed(&p->rx, m, fb_s(t->sender), p->now_ms);
    if (t->form == 't' && (st == FB_RX_ACCEPTED || st == FB_RX_COMPLETED) &&
        !fb_str_eq(m->body.chunk.xfer, p->rx_credited)) {
        /* a directed transfer (or a resend): the whole buffer is ours, grant everything */
        copy_fb(p->rx_credited, sizeof p->rx_credited, m->body.chunk.xfer);
        send_credit(p, m->body.chunk.xfer, m->body.chunk.count, t->sender);
    }
    if (st == FB_RX_DUPLICATE) p->stats.duplicates++;
    if (st == FB_RX_CORRUPT || st == FB_RX_OVERSIZE || st == FB_RX_BUSY || st == FB_RX_DIGEST_MISMATCH) {
        p->stats.dropped++;
        if (st == FB_RX_OVERSIZE) logf_(p, "dropped a transfer of %s: %llu bytes exceed rx_buf", t->sender, (unsigned long long)m->body.chunk.size);
    }
    if (st != FB_RX_COMPLETED) return;
    p->stats.transfers_completed++;
    {
        fb_str sender = m->sender;
        char s[129];
        copy_fb(s, sizeof s, sender);
        if (fb_wire_decode(m, p->rx.buf, (size_t)p->rx.size) != FB_WIRE_OK || m->kind == FB_KIND_CHUNK ||
            !fb_str_eq(m->sender, s)) {
            p->stats.dropped++;
            return;
        }
        if (seen_recently(p, m->sender, m->id)) {
            p->stats.duplicates++;
            return;
        }
        dispatch(p, t, m);
    }
}

static void on_chunk_request(fb_proto *p, const fb_msg *m) {
    fb_list_iter it;
    uint64_t idx;
    p->stats.chunk_requests_received++;
    if (p->tx.count == 0 || !fb_str_eq(m->body.chunk_request.xfer, p->tx.xfer)) return;
    fb_list_begin(&it, &m->body.chunk_request.missing);
    while (fb_list_next_uint(&it, &idx))
        if (idx < p->tx.next_index && send_tx_chunk(p, (uint32_t)idx) == 0) p->stats.chunks_resent++;
}

static void dispatch(fb_proto *p, const topic_info *t, fb_msg *m) {
    switch (m->kind) {
    case FB_KIND_CHUNK: on_chunk(p, t, m); break;
    case FB_KIND_CREDIT:
        if (t->form == 't' && p->tx_active && fb_str_eq(m->body.credit.xfer, p->tx.xfer)) {
            p->stats.credits_received++;
            fb_tx_on_credit(&p->tx, m->body.credit.upto);
            p->tx_last_ms = p->now_ms;
            pump_tx(p);
        }
        break;
    case FB_KIND_CHUNK_REQUEST:
        if (t->form == 't') on_chunk_request(p, m);
        break;
    case FB_KIND_MANIFEST:
        if (strcmp(t->sender, p->cfg.server_id) == 0) on_manifest(p, m);
        break;
    case FB_KIND_MODEL:
        if (strcmp(t->sender, p->cfg.server_id) == 0) on_model(p, m);
        break;
    case FB_KIND_ACK:
        if (t->form == 't' && fb_str_eq(m->body.ack.ref, p->join_id)) {
            if (!p->confirmed) logf_(p, "joined %s", p->run);
            p->confirmed = 1;
            if (p->state == FB_STATE_JOINING) p->state = FB_STATE_JOINED;
        } else if (t->form == 't' && fb_str_eq(m->body.ack.status, "rejected")) {
            char why[64];
            copy_fb(why, sizeof why, m->body.ack.detail);
            logf_(p, "update rejected: %s", why);
        }
        break;
    default: break;
    }
}

void fb_proto_on_message(fb_proto *p, const char *topic, const uint8_t *payload, size_t len, uint64_t now_ms) {
    topic_info t;
    fb_msg *m = &p->in;
    p->now_ms = now_ms;
    if (len == 0) return; /* a retained message being cleared */
    if (!parse_topic(p, topic, &t)) {
        p->stats.dropped++;
        return;
    }
    if (fb_wire_decode(m, payload, len) != FB_WIRE_OK || !fb_str_eq(m->sender, t.sender)) {
        p->stats.dropped++;
        return;
    }
    if (seen_recently(p, m->sender, m->id)) {
        p->stats.duplicates++;
        return;
    }
    p->stats.received++;
    dispatch(p, &t, m);
}

void fb_proto_tick(fb_proto *p, uint64_t now_ms) {
    p->now_ms = now_ms;
    if (p->state == FB_STATE_JOINING && !p->confirmed && p->join_attempts < JOIN_ATTEMPTS && now_ms >= p->next_join_ms)
        send_join(p);
    if (p->state == FB_STATE_JOINING && p->confirmed) p->state = FB_STATE_JOINED;
    if (p->tx_active) {
        if (!p->tx.credited && now_ms - p->tx_last_ms >= REQUEST_GAP_MS) {
            /* chunk 0 may have been lost: probe until the first credit */
            if (send_tx_chunk(p, 0) == 0) p->stats.probes_sent++;
            p->tx_last_ms = now_ms;
        } else if (p->tx.credited && now_ms - p->tx_last_ms >= CREDIT_TIMEOUT_MS) {
            logf_(p, "no credit for transfer %s within %u s: giving up", p->tx.xfer, CREDIT_TIMEOUT_MS / 1000);
            p->tx_active = 0;
        }
    }
    if (p->rx.active) {
        if (now_ms - p->rx.last_progress_ms >= TRANSFER_TIMEOUT_MS) {
            fb_rx_reset(&p->rx);
            p->stats.dropped++;
        } else if (now_ms - p->rx.last_progress_ms >= REQUEST_GAP_MS && now_ms - p->rx.last_request_ms >= REQUEST_GAP_MS &&
                   p->rx.requests < MAX_REQUESTS) {
            uint64_t missing[MAX_MISSING_PER_REQUEST];
            uint8_t list_buf[MAX_MISSING_PER_REQUEST * 9 + 5];
            uint32_t n = fb_rx_missing(&p->rx, missing, MAX_MISSING_PER_REQUEST);
            char id[17];
            p->rx.requests++;
            p->rx.last_request_ms = now_ms;
            if (n) {
                new_id(p, id);
                fb_msg_init(&p->out, FB_KIND_CHUNK_REQUEST, fb_s(p->cfg.namespace_), 0, fb_s(p->cfg.node_id), fb_s(id));
                p->out.body.chunk_request.xfer = fb_s(p->rx.xfer);
                fb_list_build_uint(&p->out.body.chunk_request.missing, list_buf, sizeof list_buf, missing, n);
                if (send_small(p, p->rx.sender) == 0) p->stats.chunk_requests_sent++;
            }
        }
    }
}

int fb_proto_done(const fb_proto *p) { return p->state == FB_STATE_DONE; }

int fb_proto_sending(const fb_proto *p) { return p->tx_active; }

int fb_proto_init(fb_proto *p, const fb_proto_config *cfg) {
    uint32_t i;
    memset(p, 0, sizeof *p);
    p->cfg = *cfg;
    if (!p->cfg.server_id) p->cfg.server_id = "server";
    if (!p->cfg.prefix) p->cfg.prefix = "fedbus";
    if (!cfg->node_id || !cfg->namespace_ || cfg->max_payload_bytes < 1024 || cfg->msg_cap < cfg->max_payload_bytes)
        return -1;
    p->rng = 0x9E3779B97F4A7C15ULL ^ cfg->seed;
    for (i = 0; cfg->node_id[i]; i++) p->rng = (p->rng ^ (uint8_t)cfg->node_id[i]) * 0x100000001B3ULL;
    if (!p->rng) p->rng = 1;
    fb_rx_init(&p->rx, cfg->rx_buf, cfg->rx_cap, cfg->rx_bitmap, cfg->rx_max_chunks);
    p->state = FB_STATE_WAITING;
    return 0;
}

int fb_proto_will(fb_proto *p, char topic[FB_TOPIC_MAX], uint8_t *buf, size_t cap, size_t *len) {
    char id[17];
    new_id(p, id);
    topic_out(p, topic, p->cfg.node_id, "leave");
    /* the run id is not known at connect time; the server accepts any run's Leave */
    fb_msg_init(&p->out, FB_KIND_LEAVE, fb_s(p->cfg.namespace_), 0, fb_s(p->cfg.node_id), fb_s(id));
    p->out.body.leave.reason = fb_s("connection lost");
    return fb_wire_encode(&p->out, buf, cap, len);
}

int fb_proto_train_once(fb_proto *p, const uint8_t *model, size_t len, uint8_t *out, size_t cap, size_t *out_len) {
    char id[17];
    int rc = fb_wire_decode(&p->in, model, len);
    if (rc != FB_WIRE_OK) return rc;
    if (p->in.kind != FB_KIND_MODEL) return FB_WIRE_EKIND;
    copy_fb(p->run, sizeof p->run, p->in.run);
    answer_model(p, &p->in, id);
    return fb_wire_encode(&p->out, out, cap, out_len);
}

/*
 * fb_proto: the fedbus FedAvg client as an event-driven state machine, the
 * C counterpart of fedbus/protocols/fedavg_client.py + fedbus/nodes/client.py.
 *
 *   (no run) --retained manifest--> JOINING --ack / selected--> JOINED
 *   JOINED --model (newer round, selected)--> train (or evaluate) --> update sent
 *   any --manifest "finished" of our run--> DONE
 *
 * - The run id comes from the server's retained manifest; a new run id starts
 *   a new session (fresh state, a new Join).
 * - Joins are repeated with backoff (0.5 s doubling to 8 s, 8 attempts) until
 *   the server acknowledges one or names the node in a selection.
 * - Each round is acted on at most once: models of past rounds, repeats and
 *   rounds the node is not selected for are ignored; `selected: ["*"]`
 *   selects every node (but confirms no join). `task: "evaluate"` asks
 *   for an evaluation only; `evaluate: true` evaluates before training.
 * - Training is synchronous (inside fb_proto_on_message): logistic regression,
 *   full-batch gradient descent, float32 (fb_train).
 * - Chunking both ways (wire-format.md section 8): the model broadcast is
 *   reassembled in rx_buf and missing chunks are asked for again; an update
 *   larger than one packet is sent in chunks: chunk 0, then what Credit
 *   allows, chunk 0 re-sent every second until the first credit, chunk
 *   requests answered from tx_buf.
 *
 * No heap: every buffer comes from fb_proto_config. Not thread-safe: call
 * everything from the thread that runs the MQTT loop.
 */
#ifndef FB_PROTO_H
#define FB_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include "fb_chunk.h"
#include "fb_train.h"
#include "fb_wire.h"

#ifdef __cplusplus
extern "C" {
#endif

#define FB_TOPIC_MAX 256
#define FB_ID_MAX 129

typedef int (*fb_publish_fn)(void *ctx, const char *topic, const uint8_t *payload, size_t len, int retain);
typedef void (*fb_log_fn)(void *ctx, const char *line);

typedef struct {
    const char *node_id; /* also the MQTT client id */
    const char *namespace_; /* the topology name: the topic run level */
    const char *server_id; /* default "server" */
    const char *prefix; /* default "fedbus" */
    size_t max_payload_bytes; /* the broker's packet limit, >= 1024 */
    uint32_t seed; /* for message ids (mixed with the node id and the clock) */
    /* memory */
    uint8_t *rx_buf; /* reassembly of chunked messages (the model) */
    size_t rx_cap;
    uint8_t *rx_bitmap; /* (rx_max_chunks + 7) / 8 bytes */
    uint32_t rx_max_chunks;
    uint8_t *tx_buf; /* the encoded update, kept for resends */
    size_t tx_cap;
    uint8_t *msg_buf; /* one control message or chunk at a time; >= max_payload_bytes */
    size_t msg_cap;
    float *weights; /* in*out + out floats */
    size_t weights_cap;
    float *work; /* fb_train_scratch_bytes / 4 floats */
    size_t work_cap;
    const fb_dataset *data;
    /* I/O */
    fb_publish_fn publish;
    void *publish_ctx;
    fb_log_fn log; /* may be NULL */
    void *log_ctx;
} fb_proto_config;

typedef struct {
    uint32_t received, dropped, duplicates;
    uint32_t chunks_received, chunks_sent, chunks_resent, chunk_requests_sent, chunk_requests_received;
    uint32_t credits_received, credits_sent, transfers_completed, probes_sent;
    uint32_t joins_sent, updates_sent, failures_sent, rounds_trained, evaluations;
} fb_proto_stats;

typedef enum { FB_STATE_WAITING, FB_STATE_JOINING, FB_STATE_JOINED, FB_STATE_DONE } fb_state;

typedef struct {
    fb_proto_config cfg;
    fb_state state;
    char run[FB_ID_MAX];
    uint64_t round; /* newest round heard of */
    uint64_t acted; /* newest round acted on */
    /* joining */
    char join_id[17];
    uint32_t join_attempts;
    uint64_t next_join_ms;
    uint32_t join_backoff_ms;
    int confirmed;
    /* the outgoing chunked update */
    int tx_active;
    fb_tx tx;
    size_t tx_len;
    uint64_t tx_round;
    uint64_t tx_last_ms; /* last probe or credit */
    char tx_topic[FB_TOPIC_MAX];
    /* the incoming chunked message */
    fb_rx rx;
    char rx_credited[FB_ID_MAX];
    /* duplicates */
    uint32_t recent[64];
    uint32_t recent_next;
    uint64_t rng;
    uint64_t now_ms;
    fb_msg in; /* the message being handled */
    fb_msg out; /* the message being sent */
    fb_proto_stats stats;
    char last_error[128];
} fb_proto;

int fb_proto_init(fb_proto *p, const fb_proto_config *cfg);
/* Topics to subscribe to: the server's manifest and model channels and the inbox. */
void fb_proto_subscriptions(const fb_proto *p, char manifest[FB_TOPIC_MAX], char model[FB_TOPIC_MAX],
                            char inbox[FB_TOPIC_MAX]);
/* The last will: a Leave on the node's leave channel (run level = namespace). */
int fb_proto_will(fb_proto *p, char topic[FB_TOPIC_MAX], uint8_t *buf, size_t cap, size_t *len);
void fb_proto_on_message(fb_proto *p, const char *topic, const uint8_t *payload, size_t len, uint64_t now_ms);
/* Timers: join retries, credit probes, chunk requests, expiry. Call every ~100 ms. */
void fb_proto_tick(fb_proto *p, uint64_t now_ms);
int fb_proto_done(const fb_proto *p);
/* Whether an update is still being streamed (wait for it before disconnecting). */
int fb_proto_sending(const fb_proto *p);

/* Offline: act on one encoded `model` message as if selected, and encode the
 * resulting `update` (or `update_failed`) into out. Returns FB_WIRE_*. */
int fb_proto_train_once(fb_proto *p, const uint8_t *model, size_t len, uint8_t *out, size_t cap, size_t *out_len);

#ifdef __cplusplus
}
#endif
#endif

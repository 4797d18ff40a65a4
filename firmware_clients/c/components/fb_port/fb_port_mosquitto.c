/* fb_port_mqtt over libmosquitto, for Linux hosts and small Linux boards. */
#define _POSIX_C_SOURCE 200809L
#include <mosquitto.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fb_port_mqtt.h"

struct fb_mqtt {
    struct mosquitto *mosq;
    fb_mqtt_on_message cb;
    void *user;
    int connected; /* 1 connected, -1 refused or lost */
    int pending;
};

static int lib_refs = 0;

static void on_connect(struct mosquitto *mosq, void *obj, int rc) {
    fb_mqtt *m = obj;
    (void)mosq;
    m->connected = rc == 0 ? 1 : -1;
}

static void on_disconnect(struct mosquitto *mosq, void *obj, int rc) {
    fb_mqtt *m = obj;
    (void)mosq;
    (void)rc;
    m->connected = -1;
}

static void on_publish(struct mosquitto *mosq, void *obj, int mid) {
    fb_mqtt *m = obj;
    (void)mosq;
    (void)mid;
    if (m->pending > 0) m->pending--;
}

static void on_message(struct mosquitto *mosq, void *obj, const struct mosquitto_message *msg) {
    fb_mqtt *m = obj;
    (void)mosq;
    m->cb(m->user, msg->topic, msg->payload, (size_t)(msg->payloadlen > 0 ? msg->payloadlen : 0));
}

fb_mqtt *fb_mqtt_connect(const fb_mqtt_config *cfg, fb_mqtt_on_message cb, void *user) {
    fb_mqtt *m = calloc(1, sizeof *m);
    uint64_t deadline;
    if (!m) return NULL;
    if (lib_refs++ == 0) mosquitto_lib_init();
    m->cb = cb;
    m->user = user;
    m->mosq = mosquitto_new(cfg->client_id, true, m);
    if (!m->mosq) goto fail;
    mosquitto_int_option(m->mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
    mosquitto_connect_callback_set(m->mosq, on_connect);
    mosquitto_disconnect_callback_set(m->mosq, on_disconnect);
    mosquitto_publish_callback_set(m->mosq, on_publish);
    mosquitto_message_callback_set(m->mosq, on_message);
    if (cfg->username) mosquitto_username_pw_set(m->mosq, cfg->username, cfg->password);
    if (cfg->will_topic &&
        mosquitto_will_set(m->mosq, cfg->will_topic, (int)cfg->will_len, cfg->will_payload, 1, false) !=
            MOSQ_ERR_SUCCESS)
        goto fail;
    if (mosquitto_connect(m->mosq, cfg->host, cfg->port, cfg->keepalive_s > 0 ? cfg->keepalive_s : 30) !=
        MOSQ_ERR_SUCCESS)
        goto fail;
    deadline = fb_port_now_ms() + 10000;
    while (m->connected == 0 && fb_port_now_ms() < deadline)
        if (mosquitto_loop(m->mosq, 100, 1) != MOSQ_ERR_SUCCESS) break;
    if (m->connected != 1) goto fail;
    return m;
fail:
    if (m->mosq) mosquitto_destroy(m->mosq);
    free(m);
    if (--lib_refs == 0) mosquitto_lib_cleanup();
    return NULL;
}

int fb_mqtt_subscribe(fb_mqtt *m, const char *filter, int qos) {
    return mosquitto_subscribe(m->mosq, NULL, filter, qos) == MOSQ_ERR_SUCCESS ? 0 : -1;
}

int fb_mqtt_publish(fb_mqtt *m, const char *topic, const uint8_t *payload, size_t len, int qos, int retain) {
    int rc = mosquitto_publish(m->mosq, NULL, topic, (int)len, payload, qos, retain != 0);
    if (rc != MOSQ_ERR_SUCCESS) return -1;
    if (qos > 0) m->pending++;
    return 0;
}

int fb_mqtt_loop(fb_mqtt *m, int timeout_ms) {
    int rc = mosquitto_loop(m->mosq, timeout_ms, 1);
    if (rc != MOSQ_ERR_SUCCESS || m->connected != 1) return -1;
    return 0;
}

int fb_mqtt_pending(fb_mqtt *m) { return m->pending; }

static void destroy(fb_mqtt *m) {
    mosquitto_destroy(m->mosq);
    free(m);
    if (--lib_refs == 0) mosquitto_lib_cleanup();
}

void fb_mqtt_disconnect(fb_mqtt *m) {
    uint64_t deadline = fb_port_now_ms() + 2000;
    /* let queued publishes (the last update) reach the broker before leaving */
    while (m->pending > 0 && m->connected == 1 && fb_port_now_ms() < deadline) mosquitto_loop(m->mosq, 50, 1);
    mosquitto_disconnect(m->mosq);
    mosquitto_loop(m->mosq, 50, 1);
    destroy(m);
}

void fb_mqtt_abort(fb_mqtt *m) { destroy(m); }

uint64_t fb_port_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/*
 * fb_port_mqtt: the small port layer between the fedbus client and an MQTT
 * stack. A port implements these functions once per platform: the host build
 * uses libmosquitto (fb_port_mosquitto.c); an ESP-IDF build would wrap
 * esp-mqtt, a bare-metal one paho.mqtt.embedded-c or lwIP's MQTT client.
 *
 * Requirements on a port (MQTT 3.1.1 is enough):
 * - QoS 1 publish and subscribe, a last will, a clean session;
 * - incoming PUBLISH payloads delivered whole to the callback, from inside
 *   fb_mqtt_loop (never from another thread), with a topic as a C string;
 * - fb_mqtt_publish may be called from inside the callback;
 * - fb_port_now_ms: a monotonic millisecond clock.
 */
#ifndef FB_PORT_MQTT_H
#define FB_PORT_MQTT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fb_mqtt fb_mqtt;

typedef void (*fb_mqtt_on_message)(void *user, const char *topic, const uint8_t *payload, size_t len);

typedef struct {
    const char *host;
    int port;
    const char *client_id;
    const char *username; /* NULL: none */
    const char *password; /* NULL: none */
    int keepalive_s;
    const char *will_topic; /* NULL: no will */
    const uint8_t *will_payload;
    size_t will_len;
} fb_mqtt_config;

/* Connect (blocking, bounded by the stack's own timeout). NULL on failure. */
fb_mqtt *fb_mqtt_connect(const fb_mqtt_config *cfg, fb_mqtt_on_message cb, void *user);
int fb_mqtt_subscribe(fb_mqtt *m, const char *filter, int qos);
int fb_mqtt_publish(fb_mqtt *m, const char *topic, const uint8_t *payload, size_t len, int qos, int retain);
/* Run the network for up to timeout_ms, delivering messages. 0 ok, -1 connection lost. */
int fb_mqtt_loop(fb_mqtt *m, int timeout_ms);
/* Messages queued for sending and not yet acknowledged (0 when the port cannot tell). */
int fb_mqtt_pending(fb_mqtt *m);
/* Clean disconnect (no will) and free. */
void fb_mqtt_disconnect(fb_mqtt *m);
/* Drop the connection without DISCONNECT, so the broker publishes the will. */
void fb_mqtt_abort(fb_mqtt *m);

uint64_t fb_port_now_ms(void);

#ifdef __cplusplus
}
#endif
#endif

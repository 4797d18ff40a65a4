"""Reference measurements with raw paho-mqtt clients (no fedbus code).

The same traffic patterns as fedbus's transfer benchmarks, moved by plain
paho clients, so every benchmark can print fedbus beside the reference
measured in the same run on the same broker.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from typing import Any

import paho.mqtt.client as paho

MODEL_TOPIC = "bench/model"
UPDATE_TOPIC = "bench/update"


def _client(client_id: str) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    c.max_inflight_messages_set(20)
    c.max_queued_messages_set(0)
    return c


def _connect(c: paho.Client, host: str, port: int, deadline_s: float = 20.0) -> None:
    connected = threading.Event()
    c.on_connect = lambda *_a, **_k: connected.set()
    c.connect(host, port, keepalive=60)
    c.loop_start()
    if not connected.wait(deadline_s):
        raise TimeoutError(f"{c._client_id!r} did not connect")


def _fan_worker(
    host: str, port: int, ids: list[str], payload_bytes: int, ready: Any, control: Any, results: Any
) -> None:
    payload = os.urandom(payload_bytes)
    recv_at: dict[str, float] = {}
    clients = []
    subscribed = threading.Semaphore(0)
    for cid in ids:
        c = _client(cid)

        def on_message(client: paho.Client, _u: Any, msg: Any, cid: str = cid) -> None:
            recv_at[cid] = time.monotonic()
            client.publish(f"{UPDATE_TOPIC}/{cid}", payload, qos=1)

        c.on_message = on_message
        c.on_subscribe = lambda *_a, **_k: subscribed.release()
        _connect(c, host, port)
        c.subscribe(MODEL_TOPIC, qos=1)
        clients.append(c)
    for _ in ids:
        if not subscribed.acquire(timeout=20):
            raise TimeoutError("subscribe not acknowledged")
    ready.put(len(ids))
    control.get(timeout=600)  # "stop"
    results.put(recv_at)
    for c in clients:
        c.disconnect()
        c.loop_stop()


def fan_out_in(
    host: str, port: int, *, clients: int, payload_bytes: int, procs: int = 2
) -> dict[str, float]:
    """Broadcast one payload to N clients; each answers with its own payload.

    Returns seconds: ``broadcast`` (first publish to the last client's receipt),
    ``total`` (first publish to the last answer received by the server).
    """
    ctx = mp.get_context("spawn")
    ready, control, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    ids = [f"ref-{i}" for i in range(clients)]
    workers = [
        ctx.Process(
            target=_fan_worker,
            args=(host, port, ids[p::procs], payload_bytes, ready, control, results),
            daemon=True,  # never outlive the benchmark
        )
        for p in range(procs)
    ]
    for w in workers:
        w.start()
    try:
        server = _client("ref-server")
        got: list[float] = []
        done = threading.Event()

        def on_message(_c: paho.Client, _u: Any, _msg: Any) -> None:
            got.append(time.monotonic())
            if len(got) == clients:
                done.set()

        subscribed = threading.Event()
        server.on_message = on_message
        server.on_subscribe = lambda *_a, **_k: subscribed.set()
        _connect(server, host, port)
        server.subscribe(f"{UPDATE_TOPIC}/+", qos=1)
        if not subscribed.wait(20):
            raise TimeoutError("server subscribe")
        n = sum(ready.get(timeout=120) for _ in workers)  # raises queue.Empty past the deadline
        assert n == clients
        model = os.urandom(payload_bytes)
        t0 = time.monotonic()
        server.publish(MODEL_TOPIC, model, qos=1)
        if not done.wait(300):
            raise TimeoutError(f"only {len(got)} of {clients} answers arrived")
        for _ in workers:
            control.put("stop")
        recv: dict[str, float] = {}
        for _ in workers:
            recv.update(results.get(timeout=60))
        server.disconnect()
        server.loop_stop()
        return {"broadcast": max(recv.values()) - t0, "total": max(got) - t0}
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
                w.join()


def _sink(host: str, port: int, total: int, ready: Any, results: Any) -> None:
    c = _client("ref-sink")
    received = [0]
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(_c: paho.Client, _u: Any, msg: Any) -> None:
        received[0] += len(msg.payload)
        if received[0] >= total:
            results.put(time.monotonic())
            done.set()

    c.on_message = on_message
    c.on_subscribe = lambda *_a, **_k: subscribed.set()
    _connect(c, host, port)
    c.subscribe("bench/stream", qos=1)
    if not subscribed.wait(20):
        raise TimeoutError("sink subscribe not acknowledged")
    ready.put(True)
    if not done.wait(300):
        raise TimeoutError(f"sink got only {received[0]} of {total} bytes")
    c.disconnect()
    c.loop_stop()


def stream(host: str, port: int, *, total_bytes: int, chunk_bytes: int) -> float:
    """Publish ``total_bytes`` in ``chunk_bytes`` messages to one subscriber in another process.

    Returns seconds from the first publish to the last byte received.
    """
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    sink = ctx.Process(target=_sink, args=(host, port, total_bytes, ready, results), daemon=True)
    sink.start()
    try:
        ready.get(timeout=60)
        pub = _client("ref-pub")
        _connect(pub, host, port)
        data = os.urandom(total_bytes)
        view = memoryview(data)
        t0 = time.monotonic()
        infos = [
            pub.publish("bench/stream", bytes(view[i : i + chunk_bytes]), qos=1)
            for i in range(0, total_bytes, chunk_bytes)
        ]
        t_end = results.get(timeout=300)
        for info in infos:
            info.wait_for_publish(timeout=30)
        pub.disconnect()
        pub.loop_stop()
        return float(t_end - t0)
    finally:
        sink.join(timeout=30)
        if sink.is_alive():
            sink.kill()
            sink.join()

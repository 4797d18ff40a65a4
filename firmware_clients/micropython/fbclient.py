"""The fedbus FedAvg client for MicroPython boards (ESP32 class), over umqtt.simple.

Same protocol as the C client (firmware_clients/c, fb_proto) and as
fedbus/nodes/client.py: learn the run id from the server's retained
manifest, join (repeated with backoff until acknowledged or selected), answer
each selected round's model once with an update (logistic regression,
full-batch gradient descent, float32) or an update_failed, evaluate when the
config asks, stop when the manifest says ``finished``. Chunking both ways,
with credits for the update and chunk requests for the model.

umqtt.simple may deliver messages from inside ``publish`` (while it waits
for the PUBACK), so the MQTT callback only queues what arrives; `step`
handles the queue and then publishes what the handling produced.

Usage on a board::

    from fbclient import Client, load_csv
    x, y, features = load_csv("data.csv")
    Client("fw-mp-0", "digits", x, y, features, "192.168.1.10", 1883).run()
"""

import time
from array import array

import fbchunk
import fbtrain
import fbwire

try:
    from umqtt.simple import MQTTClient
except ImportError:  # a host without umqtt: tests inject a stand-in
    MQTTClient = None

try:
    from os import urandom
except ImportError:  # some ports
    urandom = None

JOIN_ATTEMPTS = 8
REQUEST_GAP_MS = 1000
MAX_REQUESTS = 5
TRANSFER_TIMEOUT_MS = 60000
CREDIT_TIMEOUT_MS = 60000


def ticks_ms():
    """Monotonic milliseconds (time.ticks_ms on MicroPython)."""
    if hasattr(time, "ticks_ms"):
        return time.ticks_ms()
    return int(time.monotonic() * 1000)


def ticks_diff(a, b):
    """A - b in milliseconds, wrap-safe on MicroPython."""
    if hasattr(time, "ticks_diff"):
        return time.ticks_diff(a, b)
    return a - b


def load_csv(path):
    """Read ``features..., label`` lines; returns (array('f') x, bytearray y, features)."""
    x = array("f")
    y = bytearray()
    features = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            parts = line.split(",")
            if features is None:
                features = len(parts) - 1
            elif len(parts) - 1 != features:
                raise ValueError("ragged CSV line")
            for v in parts[:-1]:
                x.append(float(v))
            y.append(int(parts[-1]))
    return x, y, features or 0


def _new_id():
    if urandom is not None:
        raw = urandom(8)
    else:  # pragma: no cover - ports without os.urandom
        import random

        raw = bytes(random.getrandbits(8) for _ in range(8))
    return "".join(f"{b:02x}" for b in raw)


class Client:
    """One fedbus client node.

    Args:
        node_id: the node id, also the MQTT client id.
        namespace: the federation's topic namespace (the topology name).
        x, y, features: local data: row-major array('f'), labels, feature count.
        host, port: the broker.
        server: the server's node id.
        prefix: topic prefix.
        max_payload_bytes: the broker's packet limit (larger messages are chunked).
        max_rx_bytes: the largest reassembled message accepted.
        log: a function taking one str, or None.
        mqtt: a ready MQTTClient-like object (tests); None builds umqtt's.
    """

    def __init__(
        self,
        node_id,
        namespace,
        x,
        y,
        features,
        host="127.0.0.1",
        port=1883,
        server="server",
        prefix="fedbus",
        max_payload_bytes=131072,
        max_rx_bytes=262144,
        log=print,
        mqtt=None,
    ):
        self.id = node_id
        self.ns = namespace
        self.x, self.y, self.features = x, y, features
        self.server = server
        self.prefix = prefix
        self.max_payload = max_payload_bytes
        self.log = log
        self.mqtt = mqtt if mqtt is not None else MQTTClient(node_id, host, port=port, keepalive=30)
        self.rx = fbchunk.Rx(max_rx_bytes)
        self.run_id = ""
        self.round = 0
        self.acted = 0
        self.done = False
        self.confirmed = False
        self.join_id = ""
        self.join_attempts = 0
        self.join_backoff = 500
        self.next_join = 0
        self.tx = None
        self.tx_topic = ""
        self.tx_round = 0
        self.tx_last = 0
        self.credited_xfer = None
        self.recent = []
        self.incoming = []
        self.outgoing = []
        self._now = 0
        self.stats = {
            "received": 0,
            "dropped": 0,
            "chunks_received": 0,
            "chunks_sent": 0,
            "chunks_resent": 0,
            "chunk_requests_sent": 0,
            "credits_received": 0,
            "transfers_completed": 0,
            "joins_sent": 0,
            "updates_sent": 0,
            "failures_sent": 0,
            "rounds_trained": 0,
        }

    # -- topics ---------------------------------------------------------------

    def _out(self, sender, channel):
        return f"{self.prefix}/{self.ns}/out/{sender}/{channel}"

    def _to(self, recipient):
        return f"{self.prefix}/{self.ns}/to/{recipient}/{self.id}"

    def _parse(self, topic):
        """(form, sender) of a topic of ours, or None."""
        head = f"{self.prefix}/{self.ns}/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 3:
            return None
        if parts[0] == "out":
            return "out", parts[1]
        if parts[0] == "to" and parts[1] == self.id:
            return "to", parts[2]
        return None

    # -- connection -------------------------------------------------------------

    def connect(self):
        """Connect with a last will (a Leave) and subscribe."""
        leave = {
            "kind": "leave",
            "run": self.ns,
            "sender": self.id,
            "id": _new_id(),
            "reason": "connection lost",
        }
        self.mqtt.set_last_will(self._out(self.id, "leave"), fbwire.encode(leave), qos=1)
        self.mqtt.set_callback(self._on_mqtt)
        self.mqtt.connect()
        self.mqtt.subscribe(f"{self.prefix}/{self.ns}/to/{self.id}/+", qos=1)
        self.mqtt.subscribe(self._out(self.server, "manifest"), qos=1)
        self.mqtt.subscribe(self._out(self.server, "model"), qos=1)

    def run(self, timeout_s=None):
        """Connect and take part until the run finishes; returns True when it did."""
        self.connect()
        start = ticks_ms()
        try:
            while not self.done:
                self.mqtt.check_msg()
                self.step(ticks_ms())
                if timeout_s is not None and ticks_diff(ticks_ms(), start) > timeout_s * 1000:
                    return False
                if not self.incoming:
                    time.sleep(0.01)
            self.step(ticks_ms())
            return True
        finally:
            self.mqtt.disconnect()

    def _on_mqtt(self, topic, msg):
        self.incoming.append((topic, msg))

    def _publish(self, topic, payload):
        self.outgoing.append((topic, payload))

    def step(self, now):
        """Handle queued messages and timers, then publish what they produced."""
        while self.incoming:
            topic, msg = self.incoming.pop(0)
            if isinstance(topic, (bytes, bytearray)):
                topic = str(topic, "utf-8")
            self.on_message(topic, msg, now)
        self.tick(now)
        while self.outgoing:
            topic, payload = self.outgoing.pop(0)
            self.mqtt.publish(topic, payload, qos=1)

    # -- sending ------------------------------------------------------------------

    def _send(self, recipient, msg):
        """Send ``msg`` to ``recipient``, chunked with credits when it does not fit."""
        topic = self._to(recipient)
        payload = fbwire.encode(msg)
        if fbchunk.packet_overhead(topic) + len(payload) <= self.max_payload:
            self._publish(topic, payload)
            return
        # Resends may go to a requester's inbox: size chunks for a 64-character id too.
        worst = max(len(topic), len(self._to("r" * 64)))
        self.tx_round = msg.get("round", 0)
        probe = {
            "kind": "chunk",
            "run": self.ns,
            "round": self.tx_round,
            "sender": self.id,
            "id": "x" * 16,
            "xfer": "x" * 16,
            "index": 0xFFFFFFFE,
            "count": 0xFFFFFFFF,
            "size": 1 << 40,
            "digest": bytes(32),
            "crc": 0xFFFFFFFF,
            "data": b"",
        }
        room = fbchunk.max_chunk_data(self.max_payload, worst, len(fbwire.encode(probe)))
        self.tx = fbchunk.Tx(payload, room, _new_id())
        self.tx_topic = topic
        self.tx_last = self._now
        self._pump()

    def _chunk_msg(self, tx, index):
        msg = {
            "kind": "chunk",
            "run": self.ns,
            "round": self.tx_round,
            "sender": self.id,
            "id": _new_id(),
        }
        msg.update(tx.body(index))
        return msg

    def _send_chunk(self, index):
        self._publish(self.tx_topic, fbwire.encode(self._chunk_msg(self.tx, index)))
        self.stats["chunks_sent"] += 1

    def _pump(self):
        for index in self.tx.take():
            self._send_chunk(index)
        if self.tx.done:
            self.stats["transfers_completed"] += 1

    def _send_join(self):
        self.join_id = _new_id()
        join = {
            "kind": "join",
            "run": self.run_id,
            "sender": self.id,
            "id": self.join_id,
            "num_examples": len(self.y),
            "capabilities": {"max_payload_bytes": self.max_payload, "firmware": "micropython"},
        }
        self._send(self.server, join)
        self.stats["joins_sent"] += 1
        self.join_attempts += 1
        self.next_join = self._now + self.join_backoff
        self.join_backoff = min(8000, self.join_backoff * 2)

    # -- receiving ------------------------------------------------------------------

    def on_message(self, topic, payload, now):
        """Handle one MQTT message (topic str, payload bytes)."""
        self._now = now
        if not payload:
            return
        parsed = self._parse(topic)
        if parsed is None:
            self.stats["dropped"] += 1
            return
        form, sender = parsed
        try:
            msg = fbwire.decode(payload)
        except fbwire.WireError:
            self.stats["dropped"] += 1
            return
        if msg["sender"] != sender or self._seen(msg):
            self.stats["dropped"] += 1
            return
        self.stats["received"] += 1
        self._dispatch(form, sender, msg)

    def _seen(self, msg):
        key = (msg["sender"], msg["id"])
        if key in self.recent:
            return True
        self.recent.append(key)
        if len(self.recent) > 64:
            self.recent.pop(0)
        return False

    def _dispatch(self, form, sender, msg):
        kind = msg["kind"]
        if kind == "chunk":
            self._on_chunk(form, sender, msg)
        elif kind == "credit":
            if form == "to" and self.tx is not None and msg["xfer"] == self.tx.xfer:
                self.stats["credits_received"] += 1
                self.tx.on_credit(msg["upto"])
                self.tx_last = self._now
                if not self.tx.done:
                    self._pump()
        elif kind == "chunk_request":
            if form == "to" and self.tx is not None and msg["xfer"] == self.tx.xfer:
                for index in msg["missing"]:
                    if index < self.tx.next_index:
                        self._send_chunk(index)
                        self.stats["chunks_resent"] += 1
        elif kind == "manifest" and sender == self.server:
            self._on_manifest(msg)
        elif kind == "model" and sender == self.server:
            self._on_model(msg)
        elif kind == "ack" and form == "to":
            if msg["ref"] == self.join_id:
                self.confirmed = True
            elif msg["status"] == "rejected" and self.log:
                self.log("{}: update rejected: {}".format(self.id, msg["detail"]))

    def _on_chunk(self, form, sender, msg):
        self.stats["chunks_received"] += 1
        status = self.rx.feed(msg, sender, self._now)
        accepted = status in (fbchunk.ACCEPTED, fbchunk.COMPLETED)
        if form == "to" and accepted and self.credited_xfer != msg["xfer"]:
            # a directed transfer (or a resend): the whole buffer is ours, grant everything
            self.credited_xfer = msg["xfer"]
            credit = {
                "kind": "credit",
                "run": self.ns,
                "sender": self.id,
                "id": _new_id(),
                "xfer": msg["xfer"],
                "upto": msg["count"],
            }
            self._publish(self._to(sender), fbwire.encode(credit))
        if status != fbchunk.COMPLETED:
            if status not in (fbchunk.ACCEPTED, fbchunk.DUPLICATE):
                self.stats["dropped"] += 1
            return
        self.stats["transfers_completed"] += 1
        buf = self.rx.buf
        self.rx.buf = None
        try:
            inner = fbwire.decode(buf)
        except fbwire.WireError:
            self.stats["dropped"] += 1
            return
        if inner["kind"] == "chunk" or inner["sender"] != sender or self._seen(inner):
            self.stats["dropped"] += 1
            return
        self._dispatch(form, sender, inner)

    def _on_manifest(self, msg):
        if self.done:
            return
        finished = msg["state"] == "finished"
        if msg["run"] != self.run_id:
            if finished:
                return
            self.run_id = msg["run"]
            self.round = self.acted = 0
            self.confirmed = False
            self.tx = None
            self.join_attempts = 0
            self.join_backoff = 500
            if self.log:
                self.log(f"{self.id}: run {self.run_id}: joining")
            self._send_join()
        if self.id in msg["selected"]:
            self.confirmed = True
        self.round = max(self.round, msg["round"])
        if finished:
            self.done = True
            if self.log:
                self.log("{}: the run finished at round {}".format(self.id, msg["round"]))

    def _on_model(self, msg):
        if self.done or msg["run"] != self.run_id:
            return
        selected = self.id in msg["selected"]
        if selected:
            self.confirmed = True  # only being named confirms the join
        selected = selected or "*" in msg["selected"]  # ["*"]: every live node
        if msg["round"] < self.round:
            return
        self.round = msg["round"]
        if not selected or self.acted >= msg["round"]:
            return
        self.acted = msg["round"]
        answer = self.answer(msg)
        self._send(self.server, answer)
        self.stats["updates_sent" if answer["kind"] == "update" else "failures_sent"] += 1

    # -- local work --------------------------------------------------------------------

    def answer(self, model):
        """The update (or update_failed) answering ``model``, as a message dict."""
        envelope = {"run": model["run"], "round": model["round"], "sender": self.id}
        envelope["id"] = _new_id()
        weights = model["weights"]
        tw, tb = weights.get("dense0.w"), weights.get("dense0.b")
        why = None
        if model["encoding"] != "dense":
            why = "unsupported encoding"
        elif len(weights) != 2 or tw is None or tb is None:
            why = "unsupported model: expected logistic regression (dense0.w, dense0.b)"
        elif (
            tw["dtype"] != "float32"
            or tb["dtype"] != "float32"
            or len(tw["shape"]) != 2
            or tb["shape"] != [tw["shape"][1]]
        ):
            why = "unsupported model: expected float32 dense0.w [in, out] and dense0.b [out]"
        elif tw["shape"][0] != self.features:
            why = "the model's input width differs from the data"
        if why is not None:
            failed = {"kind": "update_failed", "reason": why, "reply_to": model["id"]}
            failed.update(envelope)
            return failed
        nin, nout = tw["shape"]
        w = array("f", bytes(tw["data"]))
        b = array("f", bytes(tb["data"]))
        config = model["config"]
        task = config.get("task")
        eval_only = task == "evaluate"
        eval_first = eval_only or config.get("evaluate") is True
        metrics = []
        if eval_first:
            loss, acc = fbtrain.evaluate(w, b, self.x, self.y, nin, nout)
        out_weights = []
        num_examples = 0
        if not eval_only:
            epochs = int(config.get("epochs", 1))
            lr = float(config.get("lr", 0.05))
            mu = float(config.get("mu", 0.0))
            anchor_w = array("f", bytes(tw["data"])) if mu > 0 else None
            anchor_b = array("f", bytes(tb["data"])) if mu > 0 else None
            try:
                train_loss = fbtrain.fit(
                    w, b, self.x, self.y, nin, nout, epochs, lr, mu, anchor_w, anchor_b
                )
            except (ValueError, MemoryError) as exc:
                failed = {"kind": "update_failed", "reason": str(exc)[:256]}
                failed["reply_to"] = model["id"]
                failed.update(envelope)
                return failed
            self.stats["rounds_trained"] += 1
            if epochs:
                metrics.append(("train_loss", train_loss))
            out_weights = [
                ("dense0.w", {"dtype": "float32", "shape": [nin, nout], "data": w}),
                ("dense0.b", {"dtype": "float32", "shape": [nout], "data": b}),
            ]
            num_examples = len(self.y)
        if eval_first:
            metrics.append(("eval_num_examples", float(len(self.y))))
            metrics.append(("eval_accuracy", acc))
            metrics.append(("eval_loss", loss))
        update = {
            "kind": "update",
            "weights": fbwire.mp.OMap(out_weights),
            "num_examples": num_examples,
            "reply_to": model["id"],
            "metrics": fbwire.mp.OMap(metrics),
        }
        update.update(envelope)
        return update

    # -- timers -------------------------------------------------------------------------

    def tick(self, now):
        """Join retries, credit probes, chunk requests, expiry."""
        self._now = now
        if (
            self.run_id
            and not self.confirmed
            and not self.done
            and self.join_attempts < JOIN_ATTEMPTS
            and ticks_diff(now, self.next_join) >= 0
        ):
            self._send_join()
        tx = self.tx
        if tx is not None and not tx.done:
            idle = ticks_diff(now, self.tx_last)
            if not tx.credited and idle >= REQUEST_GAP_MS:
                self._send_chunk(0)  # chunk 0 may have been lost: probe until credited
                self.tx_last = now
            elif tx.credited and idle >= CREDIT_TIMEOUT_MS:
                if self.log:
                    self.log(f"{self.id}: no credit for {tx.xfer}: giving up")
                self.tx = None
        rx = self.rx
        if rx.active:
            if ticks_diff(now, rx.last_progress) >= TRANSFER_TIMEOUT_MS:
                rx.active = False
                rx.buf = None
                self.stats["dropped"] += 1
            elif (
                ticks_diff(now, rx.last_progress) >= REQUEST_GAP_MS
                and ticks_diff(now, rx.last_request) >= REQUEST_GAP_MS
                and rx.requests < MAX_REQUESTS
            ):
                rx.requests += 1
                rx.last_request = now
                missing = rx.missing()
                if missing:
                    request = {
                        "kind": "chunk_request",
                        "run": self.ns,
                        "sender": self.id,
                        "id": _new_id(),
                        "xfer": rx.key[1],
                        "missing": missing,
                    }
                    self._publish(self._to(rx.key[0]), fbwire.encode(request))
                    self.stats["chunk_requests_sent"] += 1

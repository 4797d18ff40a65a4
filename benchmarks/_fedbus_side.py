"""fedbus's side of the transfer benchmarks: the same patterns as `_paho_ref`, through Messenger.

Every node is an `MqttTransport` with its own `Messenger`, as in a real
federation. Workers run in spawned processes and report ``time.monotonic``
timestamps (one clock for all processes on Linux) through queues.

Stage times come from `CodecTimer`, which wraps ``fedbus.codec.encode`` and
``decode`` for the life of a process: Messenger and Inbound look the functions
up on the module at each call, so the wrapper sees exactly the encodes and
decodes the real path performs (model messages and chunks separately), at
about a microsecond per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedbus import codec
from fedbus.config import BrokerConfig
from fedbus.messages import Chunk, ModelBroadcast, ModelUpdate, Tensor
from fedbus.transport.messenger import Messenger
from fedbus.transport.mqtt import MqttTransport

SERVER = "server"
SINK = "sink"
SOURCE = "source"
RUN = "bench"
DEADLINE_S = 180.0


@dataclass(slots=True)
class CodecTimer:
    """Seconds spent in fedbus.codec in this process, by what was (de)coded."""

    model_encode: list[float] = field(default_factory=list)
    model_decode: list[float] = field(default_factory=list)
    chunk_encode_s: float = 0.0
    chunk_decode_s: float = 0.0
    _orig: tuple[Callable[..., Any], Callable[..., Any]] | None = None

    def install(self) -> None:
        enc, dec = codec.encode, codec.decode
        self._orig = (enc, dec)

        def encode(obj: Any, *a: Any, **k: Any) -> bytes:
            t0 = time.perf_counter()
            out = enc(obj, *a, **k)
            dt = time.perf_counter() - t0
            if isinstance(obj, Chunk):
                self.chunk_encode_s += dt
            else:
                self.model_encode.append(dt)
            return out

        def decode(data: Any, *a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = dec(data, *a, **k)
            dt = time.perf_counter() - t0
            if isinstance(out, Chunk):
                self.chunk_decode_s += dt
            elif isinstance(out, ModelBroadcast | ModelUpdate):
                self.model_decode.append(dt)
            return out

        codec.encode = encode  # type: ignore[assignment]
        codec.decode = decode  # type: ignore[assignment]

    def uninstall(self) -> None:
        if self._orig is not None:
            codec.encode, codec.decode = self._orig  # type: ignore[assignment]
            self._orig = None

    def report(self) -> dict[str, Any]:
        return {
            "model_encode": list(self.model_encode),
            "model_decode": list(self.model_decode),
            "chunk_encode_s": self.chunk_encode_s,
            "chunk_decode_s": self.chunk_decode_s,
        }


@contextlib.contextmanager
def timed_codec() -> Iterator[CodecTimer]:
    timer = CodecTimer()
    timer.install()
    try:
        yield timer
    finally:
        timer.uninstall()


def _weights(params: int, seed: int) -> dict[str, Tensor]:
    arr = np.random.default_rng(seed).random(params, dtype=np.float32)
    return {"w": Tensor.from_array(arr)}


def _get(q: Any, timeout_s: float) -> Any:
    try:
        return q.get(timeout=timeout_s)
    except queue.Empty:
        raise TimeoutError(f"no message from the other process within {timeout_s} s") from None


# -- fan-out / fan-in --------------------------------------------------------------


def fan_worker(
    config: BrokerConfig, ids: list[str], params: int, ready: Any, control: Any, results: Any
) -> None:
    """Clients ``ids``: wait for the model, answer with an update, report timestamps."""
    with timed_codec() as timer:
        times = asyncio.run(_fan_clients(config, ids, params, ready, control))
    results.put({"clients": times, "codec": timer.report()})


async def _fan_clients(
    config: BrokerConfig, ids: list[str], params: int, ready: Any, control: Any
) -> dict[str, tuple[float, float, float]]:
    weights = _weights(params, seed=1)  # prepared once: the reference sends a prepared payload too
    times: dict[str, tuple[float, float, float]] = {}
    async with contextlib.AsyncExitStack() as stack:
        messengers = []
        for cid in ids:
            transport = await stack.enter_async_context(MqttTransport(config, cid))
            m = await stack.enter_async_context(Messenger(transport, node_id=cid, run=RUN))
            await m.subscribe_broadcasts(SERVER, "model")
            messengers.append(m)

        async def client(m: Messenger) -> None:
            async for _topic, message in m.messages():
                if isinstance(message, ModelBroadcast):
                    t_recv = time.monotonic()
                    assert message.weights["w"].array.size == params
                    update = ModelUpdate(
                        run=RUN,
                        round=message.round,
                        sender=m.node_id,
                        weights=weights,
                        num_examples=1,
                        reply_to=message.id,
                    )
                    t_send = time.monotonic()
                    await m.send(SERVER, update)
                    times[m.node_id] = (t_recv, t_send, time.monotonic())
                    return

        async with asyncio.timeout(DEADLINE_S):
            tasks = [asyncio.create_task(client(m)) for m in messengers]
            ready.put(len(ids))
            await asyncio.gather(*tasks)
            # Stay connected until the server has everything (chunks may be re-requested).
            await asyncio.to_thread(_get, control, DEADLINE_S)
    return times


async def fan_server(
    config: BrokerConfig, clients: int, params: int, ready: Any, nprocs: int
) -> dict[str, Any]:
    """The server's half of one round; returns its timestamps (monotonic seconds)."""
    weights = _weights(params, seed=0)
    async with (
        MqttTransport(config, SERVER) as transport,
        Messenger(transport, node_id=SERVER, run=RUN) as m,
    ):
        n = 0
        for _ in range(nprocs):
            n += await asyncio.to_thread(_get, ready, DEADLINE_S)
        assert n == clients, (n, clients)
        got: list[float] = []
        async with asyncio.timeout(DEADLINE_S):
            t0 = time.monotonic()
            await m.broadcast(
                ModelBroadcast(run=RUN, round=1, sender=SERVER, weights=weights), "model"
            )
            t_pub = time.monotonic()
            senders: set[str] = set()
            async for _topic, message in m.messages():
                if isinstance(message, ModelUpdate) and message.sender not in senders:
                    got.append(time.monotonic())
                    assert message.weights["w"].array.size == params
                    senders.add(message.sender)
                    if len(senders) == clients:
                        break
        dropped = {k: v for k, v in m.stats.dropped.items() if v}
        return {
            "t0": t0,
            "published": t_pub,
            "got": got,
            "dropped": dropped,
            "chunks_resent": m.stats.chunks_resent,
        }


# -- single stream -------------------------------------------------------------------


def stream_sink(config: BrokerConfig, params: int, ready: Any, results: Any) -> None:
    """Receive one ModelUpdate of ``params`` float32 from SOURCE; report when it arrived."""
    with timed_codec() as timer:
        t_recv = asyncio.run(_sink(config, params, ready))
    results.put({"t_recv": t_recv, "codec": timer.report()})


async def _sink(config: BrokerConfig, params: int, ready: Any) -> float:
    async with (
        MqttTransport(config, SINK) as transport,
        Messenger(transport, node_id=SINK, run=RUN) as m,
    ):
        ready.put(True)
        async with asyncio.timeout(DEADLINE_S):
            async for _topic, message in m.messages():
                if isinstance(message, ModelUpdate):
                    t_recv = time.monotonic()
                    assert message.weights["w"].array.size == params
                    return t_recv
    raise TimeoutError("stream ended without the update")


async def stream_source(config: BrokerConfig, params: int, ready: Any) -> dict[str, float]:
    """Send one ModelUpdate of ``params`` float32 to SINK; returns start and end of send()."""
    weights = _weights(params, seed=2)
    async with (
        MqttTransport(config, SOURCE) as transport,
        Messenger(transport, node_id=SOURCE, run=RUN) as m,
    ):
        await asyncio.to_thread(_get, ready, DEADLINE_S)
        async with asyncio.timeout(DEADLINE_S):
            t0 = time.monotonic()
            await m.send(
                SINK, ModelUpdate(run=RUN, round=1, sender=SOURCE, weights=weights, num_examples=1)
            )
            t_sent = time.monotonic()
        return {"t0": t0, "sent": t_sent}


def spawn(target: Callable[..., None], *args: Any) -> mp.process.BaseProcess:
    """Start ``target(*args)`` in a fresh daemon process (dies with the benchmark)."""
    proc = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def reap(procs: list[mp.process.BaseProcess], timeout_s: float = 30.0) -> None:
    """Join worker processes; kill (by their own handle) any that outlive ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)

"""Many MQTT connections in one event loop: MqttTransport (aiomqtt) vs LeanMqttTransport.

The traffic of one FedAvg round of issue 3's overhead task, without the
learning: N clients (each its own connection to one local mosquitto) receive
a broadcast from a server connection and answer with one QoS 1 publish each
to a collector connection. A round runs from the broadcast's publish to the
collector holding all N answers. Per round that is, at the broker, 2N + 1
PUBLISH packets in and 2N out with their PUBACKs; each client parses one
PUBLISH and one PUBACK and writes one PUBLISH and one PUBACK.

Both transports run in the same process against the same broker, in
alternating runs (aiomqtt, lean, aiomqtt, ...), so drift hits both alike::

    .venv/bin/python benchmarks/bench_mqtt_clients.py                  # 1,000 clients, 2 runs each
    .venv/bin/python benchmarks/bench_mqtt_clients.py --clients 100 --rounds 5 --runs 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from fedbus.broker import ManagedBroker
from fedbus.config import BrokerConfig
from fedbus.transport.lean import LeanMqttTransport
from fedbus.transport.mqtt import MqttTransport

KINDS: dict[str, Callable[..., Any]] = {"aiomqtt": MqttTransport, "lean": LeanMqttTransport}
ROUND_TIMEOUT_S = 120.0


async def _answer(client: Any, index: int, up_prefix: str, payload: bytes) -> None:
    """A client: on each broadcast, publish one QoS 1 update tagged with its round."""
    async for message in client.messages():
        await client.publish(f"{up_prefix}/{index}", message.payload[:4] + payload)


async def one_run(
    kind: str, config: BrokerConfig, *, clients: int, rounds: int, payload_bytes: int, tag: str
) -> tuple[float, list[float], list[float]]:
    """Connect ``clients`` + 2 transports of ``kind``.

    Returns:
        connect seconds, per-round wall seconds, per-round CPU seconds of this
        process (the clients' side; the rest of the wall time is mosquitto's or idle).
    """
    cls = KINDS[kind]
    down, up = f"bench/{tag}/down", f"bench/{tag}/up"
    payload = bytes(payload_bytes)
    async with contextlib.AsyncExitStack() as stack:
        start = time.perf_counter()
        nodes = [cls(config, f"{tag}-c{i}") for i in range(clients)]
        await asyncio.gather(*(stack.enter_async_context(n) for n in nodes))
        connect_s = time.perf_counter() - start
        await asyncio.gather(*(n.subscribe(down) for n in nodes))
        server = await stack.enter_async_context(cls(config, f"{tag}-server"))
        collector = await stack.enter_async_context(cls(config, f"{tag}-collector"))
        await collector.subscribe(f"{up}/+")
        stream = collector.messages()
        tasks = [asyncio.create_task(_answer(n, i, up, payload)) for i, n in enumerate(nodes)]
        times: list[float] = []
        cpu: list[float] = []
        try:
            for r in range(rounds):
                tag_bytes = r.to_bytes(4, "big")
                gc.collect()
                t0 = time.perf_counter()
                c0 = time.process_time()
                await server.publish(down, tag_bytes + payload)
                async with asyncio.timeout(ROUND_TIMEOUT_S):
                    for _ in range(clients):
                        got = await anext(stream)
                        assert got.payload[:4] == tag_bytes, "an answer from another round"
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                print(
                    f"  {kind:8s} round {r + 1}: {times[-1] * 1000:8.1f} ms "
                    f"(this process's CPU {cpu[-1] * 1000:6.1f} ms)",
                    flush=True,
                )
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return connect_s, times, cpu


async def main(args: argparse.Namespace) -> None:
    broker = ManagedBroker(kind="mosquitto")
    await asyncio.to_thread(broker.start)
    try:
        # MQTT 3.1.1 for both: the lean transport speaks nothing else.
        config = broker.client_config(protocol="3.1.1", keepalive_s=60)
        kinds = args.kinds.split(",")
        results: dict[str, list[tuple[float, list[float], list[float]]]] = {k: [] for k in kinds}
        for run in range(args.runs):
            for kind in kinds:
                print(f"run {run + 1}, {kind}, {args.clients} clients", flush=True)
                results[kind].append(
                    await one_run(
                        kind,
                        config,
                        clients=args.clients,
                        rounds=args.rounds,
                        payload_bytes=args.payload_bytes,
                        tag=f"r{run}{kind}",
                    )
                )
    finally:
        await broker.aclose()
    print(
        f"\n{args.clients} clients, {args.rounds} rounds x {args.runs} runs, "
        f"payload {args.payload_bytes} B; median per round over rounds 2..{args.rounds}"
    )
    print(
        f"{'transport':10s} {'connect s':>10s} {'round ms':>10s} {'CPU ms':>8s} "
        f"{'CPU us/client':>14s}"
    )
    medians = {}
    for kind, runs in results.items():
        medians[kind] = statistics.median(t for _, times, _ in runs for t in times[1:])
        cpu = statistics.median(t for _, _, cpus in runs for t in cpus[1:])
        connect = statistics.median(c for c, _, _ in runs)
        print(
            f"{kind:10s} {connect:10.2f} {medians[kind] * 1000:10.1f} {cpu * 1000:8.1f} "
            f"{cpu / args.clients * 1e6:14.1f}"
        )
    if len(medians) == 2:
        print(f"ratio aiomqtt / lean (round time): {medians['aiomqtt'] / medians['lean']:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--payload-bytes", type=int, default=2600)
    parser.add_argument("--kinds", default="aiomqtt,lean", help="comma-separated: aiomqtt,lean")
    asyncio.run(main(parser.parse_args()))

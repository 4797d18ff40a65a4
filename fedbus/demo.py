"""``fedbus demo``: a bus round trip, end to end, over the embedded broker.

Until the quickstart federation exists, this is what the README's first
command runs: it starts the embedded broker (or uses ``--broker`` or the
in-process bus), connects a "server" and N "clients" each over its own
connection, and runs rounds of the FedAvg traffic pattern: the server
broadcasts a model, every client answers with its own update, the server
averages them. Models above ``max_payload_bytes`` travel in chunks with flow
control. Every round checks that the average is exactly what the clients
sent, so the demo doubles as a smoke test of the whole bus.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.broker import ManagedBroker
from fedbus.config import DEFAULT_MAX_PAYLOAD_BYTES, BrokerConfig, ReconnectPolicy
from fedbus.errors import FedbusError
from fedbus.messages import ModelBroadcast, ModelUpdate, Tensor
from fedbus.transport.base import Transport
from fedbus.transport.memory import MemoryBus, MemoryTransport
from fedbus.transport.messenger import Messenger
from fedbus.transport.mqtt import MqttTransport

__all__ = ["DemoResult", "add_command", "run_demo"]

SERVER = "server"


@dataclass(slots=True)
class DemoResult:
    """What a demo run measured."""

    broker: str
    rounds: list[dict[str, float]] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)


def _client_delta(index: int, size: int) -> npt.NDArray[np.float32]:
    # Deterministic per client, so the server can check the average exactly.
    return np.full(size, (index + 1) * 1e-3, dtype=np.float32)


async def _client(messenger: Messenger, index: int, rounds: int, deadline_s: float) -> None:
    await messenger.subscribe_broadcasts(SERVER, "model")
    answered = 0
    async with asyncio.timeout(deadline_s):
        async for _topic, message in messenger.messages():
            if not isinstance(message, ModelBroadcast):
                continue
            model = message.weights["w"].array
            update = model + _client_delta(index, model.size)
            await messenger.send(
                SERVER,
                ModelUpdate(
                    run=messenger.run,
                    round=message.round,
                    sender=messenger.node_id,
                    weights={"w": Tensor.from_array(update)},
                    num_examples=index + 1,
                    reply_to=message.id,
                ),
            )
            answered += 1
            if answered == rounds:
                return


async def _server(
    messenger: Messenger, clients: int, rounds: int, params: int, deadline_s: float, out: DemoResult
) -> None:
    model = np.zeros(params, dtype=np.float32)
    weights_total = sum(range(1, clients + 1))
    updates = messenger.messages()
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        await messenger.broadcast(
            ModelBroadcast(
                run=messenger.run, round=rnd, sender=SERVER, weights={"w": Tensor.from_array(model)}
            ),
            "model",
        )
        acc = np.zeros(params, dtype=np.float64)
        got: set[str] = set()
        async with asyncio.timeout(deadline_s):
            while len(got) < clients:
                _topic, message = await anext(updates)
                if isinstance(message, ModelUpdate) and message.round == rnd:
                    got.add(message.sender)
                    acc += message.num_examples * message.weights["w"].array.astype(np.float64)
        new_model = (acc / weights_total).astype(np.float32)
        expected = (
            model.astype(np.float64)
            + sum((i + 1) * _client_delta(i, 1).astype(np.float64)[0] for i in range(clients))
            / weights_total
        )
        error = float(np.max(np.abs(new_model - expected))) if params else 0.0
        wall_s = time.perf_counter() - t0
        moved = 2 * clients * params * 4
        out.rounds.append({"round": rnd, "wall_s": wall_s, "bytes": moved, "max_error": error})
        print(
            f"round {rnd}/{rounds}: model to {clients} clients and {clients} updates back "
            f"in {wall_s:.2f} s ({moved / 1e6:.1f} MB of tensors, {moved / 1e6 / wall_s:.0f} MB/s), "
            f"aggregate max error {error:.1e}",
            flush=True,
        )
        if error > 1e-5:
            raise FedbusError(f"round {rnd}: the average differs from what clients sent by {error}")
        model = new_model


@contextlib.asynccontextmanager
async def _bus(
    args: argparse.Namespace,
) -> AsyncIterator[tuple[str, Any]]:
    """Yield a description and a factory ``make(client_id) -> Transport``."""
    if args.memory:
        bus = MemoryBus()
        yield (
            "in-process bus",
            lambda cid: MemoryTransport(bus, cid, max_payload_bytes=args.max_payload_bytes),
        )
        return
    if args.broker:
        # A demo should fail fast on a wrong URL rather than retry for minutes.
        config = BrokerConfig.from_url(
            args.broker,
            max_payload_bytes=args.max_payload_bytes,
            reconnect=ReconnectPolicy(deadline_s=args.connect_deadline_s),
        )
        yield f"broker at {config.url}", lambda cid: MqttTransport(config, cid)
        return
    async with ManagedBroker() as broker:
        if broker.notice:
            print(broker.notice, file=sys.stderr)
        config = broker.client_config(max_payload_bytes=args.max_payload_bytes)
        yield f"embedded {broker.kind} at {broker.url}", lambda cid: MqttTransport(config, cid)


async def run_demo(args: argparse.Namespace) -> DemoResult:
    """Run the demo described by parsed CLI arguments."""
    run = f"demo-{secrets.token_hex(4)}"
    async with _bus(args) as (where, make), contextlib.AsyncExitStack() as stack:
        result = DemoResult(broker=where)
        print(
            f"fedbus demo over the {where}: {args.clients} clients, model of {args.params:,} "
            f"float32 parameters ({args.params * 4 / 1e6:.1f} MB), "
            f"max payload {args.max_payload_bytes:,} B, {args.rounds} rounds",
            flush=True,
        )
        messengers: list[Messenger] = []
        for node in [SERVER] + [f"client-{i}" for i in range(args.clients)]:
            transport: Transport = make(node)
            await stack.enter_async_context(transport)
            messengers.append(
                await stack.enter_async_context(Messenger(transport, node_id=node, run=run))
            )
        server, *clients = messengers
        async with asyncio.TaskGroup() as tg:
            for i, m in enumerate(clients):
                tg.create_task(
                    _client(m, i, args.rounds, args.deadline_s), name=f"fedbus[{m.node_id}]"
                )
            # Clients subscribe before the first broadcast: give their SUBACKs a moment.
            await asyncio.sleep(0.2)
            tg.create_task(
                _server(server, args.clients, args.rounds, args.params, args.deadline_s, result),
                name="fedbus[server]",
            )
        for m in messengers:
            for reason, n in m.stats.dropped.items():
                if n:
                    result.dropped[reason] = result.dropped.get(reason, 0) + n
    total_s = sum(r["wall_s"] for r in result.rounds)
    print(
        f"done: {len(result.rounds)} rounds in {total_s:.2f} s; dropped messages: "
        f"{result.dropped or 'none'}",
        flush=True,
    )
    return result


def _handle(args: argparse.Namespace) -> int:
    try:
        asyncio.run(run_demo(args))
    except (FedbusError, TimeoutError, OSError, BaseExceptionGroup) as exc:
        print(f"fedbus demo failed: {_first_cause(exc)}", file=sys.stderr)
        return 1
    return 0


def _first_cause(exc: BaseException) -> BaseException:
    # TaskGroup wraps failures in groups; the user wants the one-line reason.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def add_command(sub: Any) -> None:
    """Register ``fedbus demo``."""
    p = sub.add_parser(
        "demo",
        help="run a bus round trip (broadcast, updates, average) over the embedded broker",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--clients", type=int, default=10, help="client nodes (default 10)")
    p.add_argument("--params", type=int, default=1_000_000, help="model parameters (default 1M)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument(
        "--max-payload-bytes",
        type=int,
        default=DEFAULT_MAX_PAYLOAD_BYTES,
        help="largest MQTT packet; bigger messages are chunked (default 1,000,000)",
    )
    p.add_argument("--broker", metavar="URL", help="use this broker instead of the embedded one")
    p.add_argument("--memory", action="store_true", help="use the in-process bus, no broker")
    p.add_argument("--deadline-s", type=float, default=120.0, help="deadline per round")
    p.add_argument(
        "--connect-deadline-s",
        type=float,
        default=10.0,
        help="give up on an unreachable --broker after this long (default 10)",
    )
    p.set_defaults(handler=_handle)

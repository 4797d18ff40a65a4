"""MemoryBus / MemoryTransport: MQTT semantics without a broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fedbus.errors import PayloadTooLargeError, TransportClosed
from fedbus.transport.base import Received, Transport, Will
from fedbus.transport.memory import MemoryBus, MemoryTransport


async def drain(t: MemoryTransport, n: int, *, timeout_s: float = 2.0) -> list[Received]:
    out: list[Received] = []
    it: AsyncIterator[Received] = t.messages()
    async with asyncio.timeout(timeout_s):
        while len(out) < n:
            out.append(await anext(it))
    return out


def pending(t: MemoryTransport) -> list[Received]:
    return list(t._queue)


async def test_is_a_transport() -> None:
    t = MemoryBus().transport("a")
    assert isinstance(t, Transport)
    assert t.client_id == "a"


async def test_wildcards_and_one_copy_per_client() -> None:
    bus = MemoryBus()
    async with bus.transport("pub") as pub, bus.transport("sub") as sub:
        await sub.subscribe("a/+/c")
        await sub.subscribe("a/#")  # overlaps: still one copy
        await sub.subscribe("x/y")
        for topic in ("a/b/c", "a/b/d", "a", "x/y", "x/y/z", "b/b/c"):
            await pub.publish(topic, topic.encode())
        assert [m.topic for m in pending(sub)] == ["a/b/c", "a/b/d", "a", "x/y"]


async def test_dollar_topics_not_matched_by_leading_wildcards() -> None:
    bus = MemoryBus()
    async with bus.transport("pub") as pub, bus.transport("sub") as sub:
        await sub.subscribe("#")
        await sub.subscribe("+/sys")
        await pub.publish("$SYS/sys", b"1")
        await pub.publish("plain/sys", b"2")
        assert [m.topic for m in pending(sub)] == ["plain/sys"]


async def test_qos_is_min_of_publish_and_subscribe() -> None:
    bus = MemoryBus()
    async with bus.transport("pub") as pub, bus.transport("sub") as sub:
        await sub.subscribe("t", qos=0)
        await pub.publish("t", b"x", qos=1)
        assert pending(sub)[0].qos == 0


async def test_unsubscribe_stops_delivery_and_prunes() -> None:
    bus = MemoryBus()
    async with bus.transport("pub") as pub, bus.transport("sub") as sub:
        await sub.subscribe("a/b/c")
        await sub.unsubscribe("a/b/c")
        await pub.publish("a/b/c", b"x")
        assert pending(sub) == []
        assert bus._root.children == {}


async def test_retained_delivered_on_subscribe_and_cleared_by_empty_payload() -> None:
    bus = MemoryBus()
    async with bus.transport("pub") as pub:
        await pub.publish("cfg/a", b"1", retain=True)
        await pub.publish("cfg/b", b"2", retain=True)
        await pub.publish("cfg/b", b"", retain=True)
        async with bus.transport("sub") as sub:
            await sub.subscribe("cfg/+")
            got = await drain(sub, 1)
            assert got == [Received("cfg/a", b"1", 1, True)]
            await pub.publish("cfg/a", b"3", retain=True)
            live = await drain(sub, 1)
            assert live[0].retain is False  # live delivery clears the flag
    assert bus.retained == {"cfg/a": b"3"}


async def test_will_on_abort_not_on_clean_close() -> None:
    bus = MemoryBus()
    will = Will("nodes/a/status", b"gone")
    async with bus.transport("watch") as watch:
        await watch.subscribe("nodes/+/status")
        clean = MemoryTransport(bus, "a", will=will)
        async with clean:
            pass
        assert pending(watch) == []
        crashing = MemoryTransport(bus, "a", will=will)
        await crashing.__aenter__()
        await crashing.abort()
        assert [m.payload for m in pending(watch)] == [b"gone"]
        with pytest.raises(TransportClosed):
            await crashing.publish("x", b"")


async def test_queue_overflow_drops_silently_and_counts() -> None:
    bus = MemoryBus(max_queued_messages=10)
    async with bus.transport("pub") as pub, bus.transport("slow") as slow:
        await slow.subscribe("t")
        for i in range(25):
            await pub.publish("t", bytes([i]))  # never raises: acked like QoS 1
        assert len(pending(slow)) == 10
        assert slow.stats.dropped_queue_full == 15
        assert slow.stats.max_queue_depth == 10
        assert bus.stats.dropped_queue_full == 15
        assert [m.payload[0] for m in await drain(slow, 10)] == list(range(10))


async def test_duplicates_by_probability_and_by_hook() -> None:
    bus = MemoryBus(duplicate_probability=1.0, seed=1)
    async with bus.transport("pub") as pub, bus.transport("sub") as sub:
        await sub.subscribe("t")
        await pub.publish("t", b"x")
        await pub.publish("t", b"y", qos=0)  # QoS 0 is never duplicated
        assert [m.payload for m in pending(sub)] == [b"x", b"x", b"y"]
        bus.duplicate = lambda topic, payload: payload == b"z"
        await pub.publish("t", b"z")
        await pub.publish("t", b"w")
        assert [m.payload for m in pending(sub)][3:] == [b"z", b"z", b"w"]
        assert bus.stats.duplicated == 2


async def test_fault_hooks_drop_tamper_delay() -> None:
    bus = MemoryBus()
    bus.drop = lambda topic, payload: payload == b"lost"
    bus.tamper = lambda topic, payload: payload.upper()
    bus.delay = lambda topic, payload: 0.01 if payload == b"late" else 0.0
    async with bus.transport("pub") as pub, bus.transport("sub") as sub:
        await sub.subscribe("t")
        for p in (b"late", b"lost", b"ok"):
            await pub.publish("t", p)
        got = await drain(sub, 2)
        assert [m.payload for m in got] == [b"OK", b"LATE"]
        assert bus.stats.dropped_by_hook == 1


async def test_oversize_publish_raises_before_delivery() -> None:
    bus = MemoryBus()
    async with (
        bus.transport("pub", max_payload_bytes=2048) as pub,
        bus.transport("sub") as sub,
    ):
        await sub.subscribe("#")
        with pytest.raises(PayloadTooLargeError):
            await pub.publish("t", bytes(2048))
        await pub.publish("t", bytes(1024))
        assert len(pending(sub)) == 1


async def test_byte_counters() -> None:
    bus = MemoryBus()
    async with bus.transport("a") as a, bus.transport("b") as b, bus.transport("c") as c:
        await b.subscribe("t")
        await c.subscribe("t")
        await a.publish("t", bytes(100))
        assert (a.stats.bytes_out, a.stats.messages_out) == (100, 1)
        assert b.stats.bytes_in == c.stats.bytes_in == 100
        assert bus.stats.delivered == 2


async def test_close_ends_iterator_and_reconnect_works() -> None:
    bus = MemoryBus()
    t = bus.transport("a")
    async with t:
        await t.subscribe("t")

        async def consume() -> list[Received]:
            return [m async for m in t.messages()]

        task = asyncio.create_task(consume())
        await t.publish("t", b"1")
        await asyncio.sleep(0)
        await t.aclose()
        async with asyncio.timeout(2):
            assert await task == [Received("t", b"1")]
    async with t:  # reusable; a clean session: subscriptions are gone
        await t.publish("t", b"2")
        assert pending(t) == []


async def test_session_takeover_closes_older_connection() -> None:
    bus = MemoryBus()
    old = bus.transport("same")
    async with old, bus.transport("same") as new:
        assert not old.connected
        assert new.connected


async def test_many_transports_inbox_routing() -> None:
    bus = MemoryBus()
    clients = [bus.transport(f"c{i}") for i in range(2000)]
    for c in clients:
        await c.__aenter__()
        await c.subscribe(f"run/to/{c.client_id}/+")
    await clients[0].publish("run/to/c1999/c0", b"hi")
    assert [len(pending(c)) for c in clients].count(1) == 1
    assert pending(clients[1999])[0].payload == b"hi"
    for c in clients:
        await c.aclose()


async def test_push_receiver_gets_one_pass_of_publishes_after_publish_returns() -> None:
    # Deliveries to a push receiver are deferred to one callback per pass of the
    # loop, in publish order: never inside the publisher's `publish`.
    bus = MemoryBus()
    got: list[bytes] = []
    async with bus.transport("pub") as pub, bus.transport("sub") as sub:
        await sub.subscribe("t/#")
        sub.set_receiver(lambda m: got.append(m.payload))
        for i in range(3):
            await pub.publish(f"t/{i}", str(i).encode())
            assert got == []  # not yet: the publisher is still running
        await asyncio.sleep(0)
        assert got == [b"0", b"1", b"2"]
        assert pending(sub) == []
        assert sub.stats.messages_in == 3


async def test_push_receiver_that_raises_loses_nothing_else() -> None:
    bus = MemoryBus()
    got: list[bytes] = []
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))

    def receiver(m: Received) -> None:
        if m.payload == b"bad":
            raise RuntimeError("boom")
        got.append(m.payload)

    async with bus.transport("pub") as pub, bus.transport("sub") as sub:
        await sub.subscribe("t")
        sub.set_receiver(receiver)
        for payload in (b"a", b"bad", b"b"):
            await pub.publish("t", payload)
        await asyncio.sleep(0)
    assert got == [b"a", b"b"]
    assert len(errors) == 1
    assert isinstance(errors[0]["exception"], RuntimeError)


async def test_pending_pushes_keep_their_order_when_the_receiver_goes() -> None:
    # A push still pending when the receiver is unset is queued for `messages`,
    # ahead of what arrives later.
    bus = MemoryBus()
    got: list[bytes] = []
    async with bus.transport("pub") as pub, bus.transport("sub") as sub:
        await sub.subscribe("t")
        sub.set_receiver(lambda m: got.append(m.payload))
        await pub.publish("t", b"1")
        sub.set_receiver(None)
        await pub.publish("t", b"2")
        await asyncio.sleep(0)
        assert got == []
        assert [m.payload for m in await drain(sub, 2)] == [b"1", b"2"]


async def test_pushes_for_a_closed_connection_are_dropped() -> None:
    bus = MemoryBus()
    got: list[bytes] = []
    sub = bus.transport("sub")
    async with bus.transport("pub") as pub:
        async with sub:
            await sub.subscribe("t")
            sub.set_receiver(lambda m: got.append(m.payload))
            await pub.publish("t", b"old")
        async with sub:  # a new connection of the same transport before the flush
            await sub.subscribe("t")
            await asyncio.sleep(0)
            assert got == []
            await pub.publish("t", b"new")
            await asyncio.sleep(0)
            assert got == [b"new"]


async def test_cached_matches_follow_subscription_changes() -> None:
    bus = MemoryBus()
    async with bus.transport("pub") as pub, bus.transport("a") as a, bus.transport("b") as b:
        await a.subscribe("x/+")
        await pub.publish("x/1", b"1")  # caches the subscribers of x/1
        await b.subscribe("x/#")
        await pub.publish("x/1", b"2")
        await a.unsubscribe("x/+")
        await pub.publish("x/1", b"3")
        assert [m.payload for m in pending(b)] == [b"2", b"3"]
        await b.aclose()
        await pub.publish("x/1", b"4")
        assert [m.payload for m in pending(a)] == [b"1", b"2"]
    assert bus.stats.delivered == 4  # 1 and 2 to a, 2 and 3 to b; 4 to nobody

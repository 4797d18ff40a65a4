"""One broker connection carrying several topic namespaces, one view per namespace.

An edge aggregator is a server toward its children (in its own namespace,
``<name>.<edge-id>``, so that a group's traffic stays local) and a client of
its parent (in the parent's namespace). On one broker that must be one
connection: the node id is the MQTT client id, and a second connection with
the same id would take the first one over. A `Messenger` is the only reader
of its transport and accepts only topics of its own namespace, so the edge
runs one messenger per namespace over a `SharedConnection`: a pump task reads
the real connection and hands each message to the view whose namespace is
its topic's run level (messages of no view are dropped and counted).

A view is a `Transport` of its own (publishing goes straight through) with
its own byte counters, which gives per-level traffic. Entering or leaving a
view does nothing: the `SharedConnection` owns the real connection, and its
``abort`` (a simulated crash) drops it without DISCONNECT, so the broker
publishes the one last will the connection carries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from fedbus.topics import DEFAULT_PREFIX
from fedbus.transport.base import Received, Transport

__all__ = ["NamespaceView", "SharedConnection", "ViewStats", "abort_transport"]


@dataclass(slots=True)
class ViewStats:
    """Payload bytes one view sent and received (the node's traffic at that level)."""

    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0


async def abort_transport(transport: object) -> None:
    """Drop ``transport`` without DISCONNECT when it can (its will goes out); else close it."""
    abort = getattr(transport, "abort", None)
    if abort is not None:
        await abort()
        return
    close = getattr(transport, "aclose", None)
    if close is not None:
        await close()


class NamespaceView:
    """The part of a `SharedConnection` whose topics are in one namespace (a `Transport`)."""

    def __init__(self, owner: SharedConnection, namespace: str) -> None:
        self._owner = owner
        self.namespace = namespace
        self.stats = ViewStats()
        self._queue: asyncio.Queue[Received | None] = asyncio.Queue()

    @property
    def client_id(self) -> str:
        """The shared connection's client id (the node id)."""
        return self._owner.transport.client_id

    @property
    def max_payload_bytes(self) -> int:
        """The shared connection's packet bound."""
        return self._owner.transport.max_payload_bytes

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish on the shared connection, counted for this view."""
        await self._owner.transport.publish(topic, payload, qos=qos, retain=retain)
        self.stats.bytes_out += len(payload)
        self.stats.messages_out += 1

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Subscribe on the shared connection (filters are namespaced, so views never overlap)."""
        await self._owner.transport.subscribe(topic_filter, qos=qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        """Drop a subscription of this view."""
        await self._owner.transport.unsubscribe(topic_filter)

    async def messages(self) -> AsyncIterator[Received]:
        """This namespace's messages until the shared connection ends."""
        while True:
            item = await self._queue.get()
            if item is None:
                self._queue.put_nowait(None)
                return
            yield item

    async def aclose(self) -> None:
        """Nothing to do: the `SharedConnection` owns the connection."""

    def _deliver(self, received: Received | None) -> None:
        if received is not None:
            self.stats.bytes_in += len(received.payload)
            self.stats.messages_in += 1
        self._queue.put_nowait(received)


class SharedConnection:
    """A connection split by topic namespace (see the module docstring).

    Args:
        transport: the real connection (not yet entered); it carries the will.
        prefix: the topic prefix, to find the namespace level.
    """

    def __init__(self, transport: Transport, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.transport = transport
        self._level = len(prefix.split("/"))
        self._views: dict[str, NamespaceView] = {}
        self._pump: asyncio.Task[None] | None = None
        self.unrouted = 0
        """Messages whose namespace has no view (dropped)."""

    def view(self, namespace: str) -> NamespaceView:
        """The view of ``namespace`` (created on first use; create it before subscribing)."""
        found = self._views.get(namespace)
        if found is None:
            found = self._views[namespace] = NamespaceView(self, namespace)
        return found

    async def __aenter__(self) -> Self:
        await self.transport.__aenter__()
        self._pump = asyncio.create_task(
            self._route(), name=f"fedbus[{self.transport.client_id}].route"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop_pump()
        await self.transport.__aexit__(exc_type, exc, tb)

    async def abort(self) -> None:
        """Drop the connection uncleanly (a simulated crash: the broker sends the will)."""
        await self._stop_pump()
        await abort_transport(self.transport)

    async def _stop_pump(self) -> None:
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        for view in self._views.values():
            view._deliver(None)

    async def _route(self) -> None:
        try:
            async for received in self.transport.messages():
                levels = received.topic.split("/")
                view = self._views.get(levels[self._level]) if len(levels) > self._level else None
                if view is None:
                    self.unrouted += 1
                else:
                    view._deliver(received)
        finally:
            for view in self._views.values():
                view._deliver(None)

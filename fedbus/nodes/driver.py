"""The generic driver of a sans-IO protocol machine (STYLE.md section 4).

A node runtime turns what happens (messages, finished training, time) into
`Event` objects and posts them here; the driver feeds them to the machine one
at a time, with ``now`` from its clock, and hands every returned `Command` to
the node's executor, in order. Deadlines: while the queue is empty the driver
waits at most until ``machine.next_deadline()`` and then feeds a tick, so a
machine with a pending deadline is always woken (reliability notes: every
wait has a deadline).

The driver is the only caller of ``machine.handle``, so the machine never
sees two events at once and ``now`` never goes backwards (the clock is
monotonic). Events come from tasks on the same event loop; work done in
threads posts its result through the loop (``asyncio.to_thread`` returns
there), never from the thread itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

from fedbus.protocols.base import Command, Event, Machine
from fedbus.protocols.fedavg import Tick

__all__ = ["Driver", "Executor"]

Executor = Callable[[Command], Awaitable[bool]]
"""Carries out one command; returns True when the machine is done (stop driving)."""


class Driver:
    """Feeds a machine its events and executes its commands.

    Args:
        machine: the protocol machine.
        execute: the node's command executor; returning True ends `run`.
        clock: monotonic seconds, the machine's notion of ``now``.
        tick: builds the event fed when a deadline passes.
    """

    def __init__(
        self,
        machine: Machine,
        execute: Executor,
        *,
        clock: Callable[[], float] = time.monotonic,
        tick: Callable[[], Event] = Tick,
    ) -> None:
        self.machine = machine
        self._execute = execute
        self._clock = clock
        self._tick = tick
        self._events: deque[Event | None] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.done = False

    def post(self, event: Event) -> None:
        """Queue ``event`` for the machine (call from the driver's event loop)."""
        self._events.append(event)
        self._wake()

    def stop(self) -> None:
        """Make `run` return after the event it is handling (if any)."""
        self._events.append(None)
        self._wake()

    def replace(self, machine: Machine) -> None:
        """Drive ``machine`` from now on (a client starting a new run session)."""
        self.machine = machine

    async def feed(self, event: Event) -> bool:
        """Handle one event now and execute its commands; True when done."""
        for command in self.machine.handle(event, now=self._clock()):
            if await self._execute(command):
                self.done = True
        return self.done

    async def run(self) -> None:
        """Drive until the executor reports done or `stop` is called."""
        events, execute, clock = self._events, self._execute, self._clock
        while not self.done:
            # A queued event is taken without a coroutine; `feed` is inlined: at
            # 1,000 simulated clients both ran twice per client and round.
            event = events.popleft() if events else await self._next(self.machine.next_deadline())
            if event is None:
                return
            for command in self.machine.handle(event, now=clock()):
                if await execute(command):
                    self.done = True

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _next(self, deadline: float | None) -> Event | None:
        """The next event, or a tick once ``deadline`` (machine clock) has passed.

        A deque and one future rather than an `asyncio.Queue` inside
        `asyncio.timeout`: the driver is the only reader, and at 1,000
        simulated clients this wait runs 1,000 times a round.
        """
        if self._events:
            return self._events.popleft()
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None
        if deadline is not None:
            delay = deadline - self._clock()
            if delay <= 0:
                return self._tick()
            timer = loop.call_later(delay, self._wake)
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._events:
            return self._events.popleft()
        return self._tick()  # woken by the timer: the deadline passed

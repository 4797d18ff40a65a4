"""The generic driver: events in order, a tick when a deadline passes, stop, done."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from fedbus.nodes.driver import Driver
from fedbus.protocols.base import Command, Event

pytestmark = pytest.mark.timeout(20)


@dataclass(frozen=True)
class Ping(Event):
    n: int


@dataclass(frozen=True)
class Tock(Event):
    pass


@dataclass(frozen=True)
class Done(Command):
    pass


@dataclass
class Recorder:
    """A machine that records what it is fed; optional deadline; Done after ``stop_after``."""

    deadline: float | None = None
    stop_after: int | None = None
    seen: list[tuple[Event, float]] = field(default_factory=list)

    def next_deadline(self) -> float | None:
        return self.deadline

    def handle(self, event: Event, *, now: float) -> list[Command]:
        self.seen.append((event, now))
        if isinstance(event, Tock):
            self.deadline = None  # a deadline is handled once
        if self.stop_after is not None and len(self.seen) >= self.stop_after:
            return [Done()]
        return []


async def _execute(command: Command) -> bool:
    return isinstance(command, Done)


async def test_events_posted_before_and_during_the_run_arrive_in_order() -> None:
    machine = Recorder(stop_after=5)
    driver = Driver(machine, _execute)  # type: ignore[arg-type]
    driver.post(Ping(0))
    driver.post(Ping(1))
    task = asyncio.create_task(driver.run())
    await asyncio.sleep(0)
    for n in (2, 3, 4):
        driver.post(Ping(n))
        await asyncio.sleep(0)
    await asyncio.wait_for(task, 5)
    assert [e.n for e, _ in machine.seen if isinstance(e, Ping)] == [0, 1, 2, 3, 4]
    assert driver.done


async def test_a_passed_deadline_feeds_a_tick_at_or_after_it() -> None:
    clock = asyncio.get_running_loop().time
    deadline = clock() + 0.05
    machine = Recorder(deadline=deadline, stop_after=2)
    driver = Driver(machine, _execute, clock=clock, tick=Tock)  # type: ignore[arg-type]
    task = asyncio.create_task(driver.run())
    await asyncio.sleep(0.2)  # no event: only the deadline wakes the driver
    assert len(machine.seen) == 1
    event, now = machine.seen[0]
    assert isinstance(event, Tock)
    assert now >= deadline
    driver.post(Ping(1))
    await asyncio.wait_for(task, 5)
    assert isinstance(machine.seen[1][0], Ping)


async def test_an_event_before_the_deadline_is_fed_without_a_tick() -> None:
    clock = asyncio.get_running_loop().time
    machine = Recorder(deadline=clock() + 60.0, stop_after=1)
    driver = Driver(machine, _execute, clock=clock, tick=Tock)  # type: ignore[arg-type]
    task = asyncio.create_task(driver.run())
    await asyncio.sleep(0.01)
    driver.post(Ping(7))
    await asyncio.wait_for(task, 5)
    assert [type(e) for e, _ in machine.seen] == [Ping]


async def test_an_overdue_deadline_ticks_at_once() -> None:
    clock = asyncio.get_running_loop().time
    machine = Recorder(deadline=clock() - 1.0, stop_after=1)
    driver = Driver(machine, _execute, clock=clock, tick=Tock)  # type: ignore[arg-type]
    await asyncio.wait_for(driver.run(), 5)
    assert [type(e) for e, _ in machine.seen] == [Tock]


async def test_stop_ends_the_run_after_earlier_events() -> None:
    machine = Recorder()
    driver = Driver(machine, _execute)  # type: ignore[arg-type]
    task = asyncio.create_task(driver.run())
    await asyncio.sleep(0)
    driver.post(Ping(1))
    driver.stop()
    driver.post(Ping(2))  # after the stop: never fed
    await asyncio.wait_for(task, 5)
    assert [e.n for e, _ in machine.seen if isinstance(e, Ping)] == [1]
    assert not driver.done

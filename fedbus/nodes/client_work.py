"""Where a client's local work runs: inline on the event loop, or in a thread.

A thread hop costs more than a tiny fit (at 1,000 simulated clients of 20
samples each, threads made the round about 15 % slower, and their GIL
hand-offs stall the loop), and blocking the loop for a fraction of a
millisecond delays nothing. So fedbus's own numpy trainer (exactly
`NumpyTrainer`, whose work is pure CPU and never waits on anything) runs
work known to be tiny, under ``INLINE_WORK_S`` of CPU, on the loop. Work of
unknown cost, and any other trainer's work (user code may block, e.g. on
something only the event loop would deliver), goes to a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Final, Literal, TypeVar

from fedbus.learning.trainer import Trainer
from fedbus.learning.trainers import NumpyTrainer

__all__ = ["INLINE_WORK_S", "WorkTimer"]

INLINE_WORK_S: Final = 0.002
"""Local work that last took less than this runs on the event loop (module docstring)."""

_PROBE_WAIT_S: Final = 0.05
"""How long a node waits for another node's first measured work before using a thread."""

_PROBES: dict[tuple[type, str], tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}
"""(trainer class, kind) -> (its loop, an event set once the first such work was measured)."""

_COST_PER_EXAMPLE: dict[tuple[type, str], float] = {}
"""(trainer class, "fit"/"evaluate") -> CPU seconds per local example last measured here."""

_T = TypeVar("_T")

Kind = Literal["fit", "evaluate"]


class WorkTimer:
    """Runs one node's local work where it is cheapest, measuring it as it goes.

    Args:
        trainer: the node's trainer; only exactly `NumpyTrainer` is ever inlined.
        num_examples: the node's local examples (scales other nodes' per-example cost).
    """

    def __init__(self, trainer: Trainer, num_examples: int) -> None:
        self._inlinable = type(trainer) is NumpyTrainer
        self._class = type(trainer)
        self._num_examples = num_examples
        self._used: dict[str, float] = {}  # kind of work -> CPU seconds it last took

    def estimate(self, kind: Kind) -> float | None:
        """Expected CPU seconds of this node's next work of ``kind`` (None: unknown)."""
        estimate = self._used.get(kind)
        if estimate is None:
            per_example = _COST_PER_EXAMPLE.get((self._class, kind))
            if per_example is not None and self._num_examples:
                estimate = per_example * self._num_examples
        return estimate

    def tiny(self, kind: Kind) -> bool:
        """Whether `run` would run the next work of ``kind`` on the loop."""
        if not self._inlinable:
            return False
        estimate = self.estimate(kind)
        return estimate is not None and estimate < INLINE_WORK_S

    def run_now(self, kind: Kind, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the loop, measured: only for work `tiny` allows.

        What `run` does for such work, without a coroutine to create and
        await (`fedbus.nodes.client.ClientNode._work_now`).
        """
        # On the loop, wall time is the CPU time (see `run`).
        return self._measured(kind, time.perf_counter, fn, *args)

    def _measured(
        self, kind: Kind, clock: Callable[[], float], fn: Callable[..., _T], *args: Any
    ) -> _T:
        """``fn(*args)``, recording what it used by ``clock`` for this node and per example."""
        started = clock()
        try:
            return fn(*args)
        finally:
            used = clock() - started
            self._used[kind] = used
            if self._num_examples:
                _COST_PER_EXAMPLE[(self._class, kind)] = used / self._num_examples

    async def run(self, kind: Kind, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` in a worker thread, or inline when it is known to be tiny.

        Tiny: this node's previous work of this ``kind`` used under
        ``INLINE_WORK_S`` of CPU; before its first one, the per-example cost
        measured in this process, times this node's examples. CPU time, not
        wall time: a fit in a thread waits for the GIL while the loop runs
        1,000 other clients, and that wait says nothing of its cost.

        The first work of a kind in the process runs in a thread and is
        measured; nodes that need an estimate meanwhile wait for it (up to
        ``_PROBE_WAIT_S``), so 1,000 clients starting together do not all take
        the thread path in round 1.
        """
        if not self._inlinable:
            return await asyncio.to_thread(fn, *args)
        key = (self._class, kind)
        estimate = self.estimate(kind)
        probe: asyncio.Event | None = None
        if estimate is None:
            loop = asyncio.get_running_loop()
            entry = _PROBES.get(key)
            waiting = entry[1] if entry is not None and entry[0] is loop else None
            if waiting is None:
                probe = asyncio.Event()
                _PROBES[key] = (loop, probe)
            elif not waiting.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_PROBE_WAIT_S):
                        await waiting.wait()
                estimate = self.estimate(kind)

        if estimate is not None and estimate < INLINE_WORK_S:
            # On the loop, wall time is the CPU time (nothing else runs meanwhile),
            # and perf_counter is several times cheaper than thread_time (a system call).
            return self._measured(kind, time.perf_counter, fn, *args)
        try:
            return await asyncio.to_thread(self._measured, kind, time.thread_time, fn, *args)
        finally:
            if probe is not None:
                probe.set()

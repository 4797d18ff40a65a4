"""Simulated clients in worker processes: ``fedbus run --workers N``.

Why: every simulated client of ``fedbus run`` shares one Python event loop,
so a run uses one core however many the machine has; at 1,000 clients that
loop is the bottleneck (docs/benchmarks.md). With an MQTT broker the clients
need nothing from the parent but the broker's address, so ``--workers N``
starts N processes (``python -m fedbus.launch._worker SPEC``), each hosting
an interleaved share of the clients, built exactly as in-process clients are
(same data partition, trainer, faults and attacks: all follow from the
topology and its seed). The server stays in the parent.

A worker rebuilds the topology from its text with the parent's overrides
(rounds, seed, the broker's URL and client), runs its clients until each
ends (the run finished, a simulated crash, or SIGTERM) and writes their
outcomes to a JSON file the parent reads. The parent stops workers by PID:
SIGTERM when the run is over and they have not ended within the grace
period, SIGKILL if that does not end them either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from fedbus.errors import ConfigError

__all__ = ["WorkerPool", "WorkerSpec", "main"]

log = logging.getLogger(__name__)

_STOP_S: Final = 5.0
"""How long a worker gets to end after SIGTERM before SIGKILL."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one worker needs (written as JSON next to its outcomes file)."""

    topology_text: str
    base_dir: str
    rounds: int
    seed: int
    broker_url: str
    lean: bool
    clients: list[str]
    outcomes: str


class WorkerPool:
    """The worker processes of one run, their clients, and their outcomes."""

    def __init__(self) -> None:
        self._procs: list[tuple[asyncio.subprocess.Process, WorkerSpec]] = []
        self._dir = tempfile.TemporaryDirectory(prefix="fedbus-workers-")
        self._watches: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def clients(self) -> list[str]:
        """Every client id a worker hosts."""
        return [cid for _, spec in self._procs for cid in spec.clients]

    async def start(self, specs: list[WorkerSpec]) -> None:
        """Start one worker per spec (its outcomes file path is filled in here)."""
        for i, spec in enumerate(specs):
            spec_path = Path(self._dir.name) / f"worker-{i}.json"
            spec = WorkerSpec(**{**asdict(spec), "outcomes": str(spec_path) + ".out"})
            _write_json(spec_path, asdict(spec))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fedbus.launch._worker", str(spec_path)
            )
            self._procs.append((proc, spec))
            watch = asyncio.create_task(self._watch(proc, len(spec.clients)))
            self._watches.add(watch)
            watch.add_done_callback(self._watches.discard)
            log.info("worker %d (pid %d): %d clients", i, proc.pid, len(spec.clients))

    async def _watch(self, proc: asyncio.subprocess.Process, clients: int) -> None:
        """Say at once when a worker fails: the server would only notice its clients missing."""
        code = await proc.wait()
        if code not in (0, -signal.SIGTERM, 130) and not self._stopping:
            log.warning("worker pid %d (%d clients) exited with %d", proc.pid, clients, code)

    async def finish(self, grace_s: float) -> dict[str, tuple[str, str]]:
        """Wait up to ``grace_s`` for the workers to end, stop the rest; their outcomes.

        Returns client id -> (status, reason); a client whose worker wrote no
        outcome is ("failed", why).
        """
        waits = [asyncio.create_task(proc.wait()) for proc, _ in self._procs]
        if waits:
            await asyncio.wait(waits, timeout=grace_s)
        await self.stop()
        outcomes: dict[str, tuple[str, str]] = {}
        for proc, spec in self._procs:
            written = _read_outcomes(spec.outcomes)
            for cid in spec.clients:
                status, reason = written.get(cid, ("failed", f"worker exited {proc.returncode}"))
                outcomes[cid] = (str(status), str(reason))
        return outcomes

    async def stop(self) -> None:
        """SIGTERM every live worker, SIGKILL what is still alive after ``_STOP_S``. Idempotent."""
        self._stopping = True
        live = [proc for proc, _ in self._procs if proc.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in live:
            try:
                await asyncio.wait_for(proc.wait(), _STOP_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    def close(self) -> None:
        """Kill any worker still running (no waiting) and remove the spec files."""
        for watch in self._watches:
            watch.cancel()
        for proc, _ in self._procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        self._dir.cleanup()


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def _write_outcomes(path: str, outcomes: dict[str, tuple[str, str]]) -> None:
    _write_json(Path(path), outcomes)


def _read_outcomes(path: str) -> dict[str, list[str]]:
    """What a worker wrote (nothing if it wrote nothing readable: it was killed)."""
    try:
        written = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return written if isinstance(written, dict) else {}


def share(clients: list[str], workers: int) -> list[list[str]]:
    """``clients`` dealt round-robin into ``workers`` non-empty groups (fewer if fewer clients)."""
    groups = [clients[i::workers] for i in range(min(workers, len(clients)))]
    return [g for g in groups if g]


async def _serve(spec: WorkerSpec) -> dict[str, tuple[str, str]]:
    from fedbus.launch.build import build_data, client_trainer, fault_plan
    from fedbus.launch.federation import client_settings, mqtt_connect
    from fedbus.launch.gcfreeze import QuietCollector
    from fedbus.launch.robustness import AttackPlan
    from fedbus.nodes import ClientNode
    from fedbus.topology import apply_overrides, loads_topology
    from fedbus.transport.base import Transport, Will

    topology = apply_overrides(
        loads_topology(spec.topology_text),
        rounds=spec.rounds, seed=spec.seed, broker_url=spec.broker_url,
    )  # fmt: skip
    # The URL override keeps the topology's credentials, TLS files and packet size.
    config = topology.broker.config
    assert config is not None  # broker_url names a broker
    connect = mqtt_connect(config, lean=spec.lean)
    data = await asyncio.to_thread(build_data, topology, Path(spec.base_dir))
    attacks = AttackPlan(topology, data)
    nodes: dict[str, ClientNode] = {}
    for cid in spec.clients:
        trainer = client_trainer(topology, data, cid)

        def bound(will: Will, cid: str = cid) -> Transport:
            return connect(cid, will)

        nodes[cid] = ClientNode(
            trainer, bound, client_settings(topology, cid),
            faults=fault_plan(topology, cid), attack=attacks.client_attack(cid, trainer),
        )  # fmt: skip
    collector = QuietCollector()  # as in run_federation (fedbus.launch.gcfreeze)
    tasks = {
        cid: asyncio.create_task(node.run(), name=f"fedbus[{cid}].node")
        for cid, node in nodes.items()
    }
    outcomes: dict[str, tuple[str, str]] = {}
    try:
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    finally:
        collector.close()
        for cid, task in tasks.items():
            if task.done() and not task.cancelled() and task.exception() is None:
                result = task.result()
                outcomes[cid] = (result.status, result.reason)
            else:
                task.cancel()
                outcomes[cid] = ("failed", "stopped")
        _write_outcomes(spec.outcomes, outcomes)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    """``python -m fedbus.launch._worker SPEC.json``: host the spec's clients; 0 when all finished."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fedbus.launch._worker SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = WorkerSpec(**json.loads(Path(args[0]).read_text(encoding="utf-8")))

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        outcomes = asyncio.run(_serve(spec))
    except KeyboardInterrupt:
        return 130
    except ConfigError as exc:
        print(f"fedbus worker {os.getpid()}: {exc}", file=sys.stderr)
        return 2
    return 0 if all(status != "failed" for status, _ in outcomes.values()) else 1

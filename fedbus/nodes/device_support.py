"""What a `fedbus.nodes.device.DeviceNode` is configured with, and the work it does.

`DeviceSettings` (identity, possible parents, re-homing), `ConnectTo` (how
to reach a parent's broker), `DeferredMachine` (the driver's view of a
machine built only once the run id is known), and `device_work`: one
``Train`` or ``Evaluate`` in a worker thread, or, for a simulated attacker
(`fedbus.launch.robustness.ClientAttack`), the forged result it sends
instead of honest training. The attack is told the *top-level* round (its
``rounds``/``every`` name cloud rounds, as ``attacks`` are validated against
``protocol.rounds``) and the local round's selection, with ``*`` spelled out
as the parent's children: its coalition and n are those of its edge.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedbus.learning.seeds import fit_seed
from fedbus.learning.trainer import FitConfig, Trainer
from fedbus.messages import ALL_SELECTED
from fedbus.nodes.client import LocalAttack
from fedbus.nodes.shared_views import scalars
from fedbus.nodes.training import run_local_work
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg import Evaluate, Train, TrainingDone, TrainingFailed
from fedbus.protocols.hierarchical_rehoming import RehomeConfig
from fedbus.transport.base import Transport, Will

__all__ = ["ConnectTo", "DeferredMachine", "DeviceSettings", "device_work"]

log = logging.getLogger(__name__)

ConnectTo = Callable[[str, Will], Transport]
"""Builds a connection (not yet entered) to the broker of ``parent``'s children."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSettings:
    """Who the device is and where its parents live.

    Attributes:
        node_id: this device's id.
        parent: its parent at start.
        namespaces: each possible parent's children's namespace.
        watch: each possible parent's other namespaces where its will may appear.
        groups: each possible parent's children (an attack's ``*`` selection).
        seed: the run's seed (local training seeds).
        rehome: fallbacks and watchdog; None never re-homes.
        join_attempts: Joins per connection before giving up on an answer.
        join_backoff_s: first wait for an answer; doubles per attempt (max 8 s).
        round_hint_s: assumed round length (churn down time).
    """

    node_id: str
    parent: str
    namespaces: Mapping[str, str]
    watch: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    seed: int = 0
    rehome: RehomeConfig | None = None
    join_attempts: int = 8
    join_backoff_s: float = 0.5
    round_hint_s: float = 2.0


async def device_work(
    trainer: Trainer,
    command: Train | Evaluate,
    settings: DeviceSettings,
    post: Callable[[Event], None],
    *,
    attack: LocalAttack | None = None,
    top_round: int = 0,
    selected: Sequence[str] = (),
    parent: str = "",
) -> None:
    """Do ``command`` honestly (`run_local_work`), or as ``attack`` forges it."""
    node_id, seed = settings.node_id, settings.seed
    if attack is None or not isinstance(command, Train):
        await run_local_work(trainer, command, node_id, seed, post)
        return
    cfg = command.config
    fit = FitConfig(
        epochs=int(cfg.get("epochs", 1)), batch_size=int(cfg.get("batch_size", 16)),
        lr=float(cfg.get("lr", 0.05)), mu=float(cfg.get("mu", 0.0)),
        seed=fit_seed(seed, command.round, node_id),
    )  # fmt: skip
    if ALL_SELECTED in selected:
        selected = settings.groups.get(parent, tuple(selected))
    try:
        forged = await attack.fit(top_round, command.weights, fit, selected)
    except Exception as exc:  # the simulated attack failed: data for the machine, as training
        log.warning("%s: attack for round %d failed: %r", node_id, command.round, exc)
        post(TrainingFailed(round=command.round, reason=f"{type(exc).__name__}: {exc}"))
        return
    if forged is None:  # not an active round: train honestly
        await run_local_work(trainer, command, node_id, seed, post)
        return
    post(
        TrainingDone(
            round=command.round, weights=dict(forged.weights), num_examples=forged.num_examples,
            metrics=scalars(forged.metrics), encoding="delta" if forged.is_delta else "dense",
        )
    )  # fmt: skip


class _Machine(Protocol):
    @property
    def state(self) -> enum.Enum: ...

    def next_deadline(self) -> float | None: ...

    def handle(self, event: Event, *, now: float) -> list[Command]: ...


class _NoMachine(enum.Enum):
    WAITING_FOR_RUN = "waiting_for_run"


class DeferredMachine:
    """The driver's view of a device machine that may be built after the driver.

    Args:
        current: returns the machine, or None while the run id is unknown.
    """

    def __init__(self, current: Callable[[], _Machine | None]) -> None:
        self._current = current

    @property
    def state(self) -> enum.Enum:
        """The machine's state, or WAITING_FOR_RUN."""
        machine = self._current()
        return _NoMachine.WAITING_FOR_RUN if machine is None else machine.state

    def next_deadline(self) -> float | None:
        """The machine's deadline (none before it exists)."""
        machine = self._current()
        return None if machine is None else machine.next_deadline()

    def handle(self, event: Event, *, now: float) -> list[Command]:
        """Feed the machine (events before it exists are dropped)."""
        machine = self._current()
        return [] if machine is None else machine.handle(event, now=now)

"""Local work of a data-holding node: one `Train` or `Evaluate` in a worker thread.

Shared by the device and peer runtimes (the FedAvg client keeps its own copy
inside `fedbus.nodes.client`). The trainer runs in ``asyncio.to_thread`` so
the node's messages keep flowing; its result, or its failure as data, goes
back to the machine through ``post`` on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fedbus.learning.seeds import fit_seed
from fedbus.learning.trainer import FitConfig, Trainer
from fedbus.nodes.shared_views import scalars
from fedbus.protocols.base import Event
from fedbus.protocols.fedavg import Evaluate, EvaluationDone, Train, TrainingDone, TrainingFailed

__all__ = ["run_local_work"]

log = logging.getLogger(__name__)


async def run_local_work(
    trainer: Trainer,
    command: Train | Evaluate,
    node_id: str,
    seed: int,
    post: Callable[[Event], None],
) -> None:
    """Do ``command`` with ``trainer`` and post its outcome (round r trains with ``fit_seed``)."""
    round_num = command.round
    try:
        if isinstance(command, Train):
            cfg = command.config
            fit = FitConfig(
                epochs=int(cfg.get("epochs", 1)), batch_size=int(cfg.get("batch_size", 16)),
                lr=float(cfg.get("lr", 0.05)), mu=float(cfg.get("mu", 0.0)),
                seed=fit_seed(seed, round_num, node_id),
            )  # fmt: skip
            result = await asyncio.to_thread(trainer.fit, command.weights, fit)
            event: Event = TrainingDone(
                round=round_num, weights=dict(result.weights), num_examples=result.num_examples,
                metrics=scalars(result.metrics), encoding="delta" if result.is_delta else "dense",
            )  # fmt: skip
        else:
            ev = await asyncio.to_thread(trainer.evaluate, command.weights)
            metrics = {"accuracy": ev.accuracy, "loss": ev.loss, **ev.metrics}
            event = EvaluationDone(
                round=round_num, num_examples=ev.num_examples, metrics=scalars(metrics)
            )
    except Exception as exc:  # the user's trainer failed: that is data for the machine
        log.warning("%s: local work for round %d failed: %r", node_id, round_num, exc)
        event = TrainingFailed(round=round_num, reason=f"{type(exc).__name__}: {exc}")
    post(event)

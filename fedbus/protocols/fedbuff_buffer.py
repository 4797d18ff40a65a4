"""FedBuff's buffer entries: what an accepted update becomes, and how a buffer is judged.

Kept apart from the machine (`fedbus.protocols.fedbuff`, whose docstring states
the rules) so that module stays about states, deadlines and aggregation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus._types import NodeId
from fedbus.aggregation import DELTA, DENSE, ClientUpdate, Validator
from fedbus.protocols.fedavg_types import UpdateReceived

__all__ = ["Buffered", "buffered", "invalid_detail", "validate_buffer"]


@dataclass(frozen=True, slots=True)
class Buffered:
    """One accepted update: its change to the model version it was trained on."""

    sender: NodeId
    version: int
    update_id: str
    delta: dict[str, npt.NDArray[np.float64]]
    num_examples: int
    train_loss: float | None

    @property
    def key(self) -> str:
        """The sender key validators see: unique in a buffer (one update per sender and version)."""
        return f"{self.sender}@{self.version}"


def buffered(event: UpdateReceived, base: Mapping[str, npt.NDArray[Any]]) -> Buffered:
    """``event`` as a buffer entry; a dense update becomes a delta against ``base``."""
    delta = {
        n: (
            np.asarray(event.weights[n], np.float64)
            if event.encoding == DELTA
            else np.asarray(event.weights[n], np.float64) - np.asarray(b, np.float64)
        )
        for n, b in base.items()
    }
    loss = event.metrics.get("train_loss")
    return Buffered(
        sender=event.sender, version=event.round, update_id=event.update_id, delta=delta,
        num_examples=event.num_examples,
        train_loss=float(loss) if isinstance(loss, int | float) else None,
    )  # fmt: skip


def invalid_detail(event: UpdateReceived, model: Mapping[str, npt.NDArray[Any]]) -> str:
    """Why ``event``'s tensors do not fit ``model`` ("" when they do)."""
    if event.encoding not in (DENSE, DELTA):
        return f"unknown encoding {event.encoding!r}"
    if event.num_examples < 1:
        return f"num_examples must be positive, got {event.num_examples}"
    if list(event.weights) != list(model):
        return "tensor names differ from the model's"
    for name, current in model.items():
        value = np.asarray(event.weights[name])
        if value.shape != current.shape:
            return f"{name}: shape {list(value.shape)}, the model has {list(current.shape)}"
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"{name}: contains NaN or infinity"
    return ""


def validate_buffer(
    validators: Sequence[Validator],
    weights: Mapping[str, npt.NDArray[Any]],
    ordered: Sequence[Buffered],
    *,
    round: int,
) -> dict[str, str]:
    """``{key: reason}`` for each entry the validators reject (the first reason wins).

    Each validator sees the entries the earlier ones passed, as delta updates
    applied to ``weights`` (the current model), keyed by `Buffered.key`.
    """
    updates = [
        ClientUpdate(
            sender=b.key, weights=b.delta, num_examples=b.num_examples, encoding=DELTA,
            round=b.version,
        )
        for b in ordered
    ]  # fmt: skip
    verdicts: dict[str, str] = {}
    for validator in validators:
        found = validator.validate(weights, updates, round=round)
        for key in sorted(found):
            verdicts.setdefault(key, found[key])
        updates = [u for u in updates if u.sender not in found]
    return verdicts

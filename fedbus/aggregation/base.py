"""The aggregator and validator interfaces every aggregating node speaks.

An aggregator is a pure function of (current global weights, this round's
updates) plus, for server optimizers such as FedAdam, state kept inside the
aggregator object. The same interface serves the central server, an edge
aggregator and a gossip peer, so later aggregators (median, trimmed mean, Krum,
Bulyan, RFA, FedAvgM, FedAdam/Yogi/Adagrad, FedNova, SCAFFOLD, q-FedAvg,
FedBuff) plug in without changing callers:

- every update carries its sender, sample count, metrics (FedNova's local step
  count, q-FedAvg's loss), encoding ("dense" weights or a "delta"), the round
  whose model it started from (FedBuff's staleness) and ``extras``: further
  named tensor sets travelling with it (SCAFFOLD's control-variate deltas);
- state is a flat mapping of named numpy arrays, so a checkpoint stores it in
  the same wire format as the model;
- an aggregator that cannot run on the updates it got (Bulyan with n < 4f+3)
  raises `AggregationError`; the server then treats the round as failed.

Order independence is part of the contract: `sorted_updates` fixes one order
(by sender id) before any arithmetic, so arrival order never changes a bit.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from fedbus.errors import FedbusError

__all__ = [
    "DELTA",
    "DENSE",
    "AggregationError",
    "Aggregator",
    "Arrays",
    "ClientUpdate",
    "Validator",
    "broadcast_extras",
    "cast_like",
    "sorted_updates",
]

Arrays = Mapping[str, npt.NDArray[Any]]
"""Named tensors in model order (numpy arrays)."""

DENSE = "dense"
"""Update encoding: the tensors are the client's new weights."""
DELTA = "delta"
"""Update encoding: the tensors are new weights minus the global weights received."""


class AggregationError(FedbusError):
    """An aggregator cannot combine the updates it was given (e.g. too few for its bound)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientUpdate:
    """One accepted update, as an aggregator sees it.

    Attributes:
        sender: node id; aggregators order updates by it.
        weights: new weights (``encoding`` "dense") or their delta to the global model.
        num_examples: the sample weight (FedAvg's n_k).
        encoding: "dense" or "delta".
        metrics: the client's scalar metrics (loss, local steps, eval results).
        round: the round whose global model the update started from.
        extras: more named tensor sets, e.g. ``{"control": ...}`` for SCAFFOLD.
    """

    sender: str
    weights: Arrays
    num_examples: int
    encoding: str = DENSE
    metrics: Mapping[str, float] = field(default_factory=dict)
    round: int = 0
    extras: Mapping[str, Arrays] = field(default_factory=dict)


@runtime_checkable
class Aggregator(Protocol):
    """Combines one round's updates into new global weights.

    Implementations must be deterministic functions of their inputs and state,
    independent of the order of ``updates``.
    """

    def aggregate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Return the new global weights, with the global model's names, shapes and dtypes.

        Raises:
            AggregationError: the updates cannot be combined (too few, bound violated).
        """
        ...

    def state_dict(self) -> dict[str, npt.NDArray[Any]]:
        """Server-side state (optimizer moments...) as named arrays; empty when stateless."""
        ...

    def load_state_dict(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        """Restore state saved by `state_dict` (resume from a checkpoint)."""
        ...


@runtime_checkable
class Validator(Protocol):
    """Screens a round's updates before aggregation.

    It sees the whole round at once, so both per-update checks (norm bound,
    validation accuracy) and cross-round ones (3-sigma outliers) fit.
    """

    def validate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, str]:
        """Return ``{sender: reason}`` for each update to reject; senders not named pass."""
        ...


def broadcast_extras(aggregator: object, global_weights: Arrays) -> dict[str, Arrays]:
    """Tensor sets an aggregator sends down with the model ({} for most).

    An aggregator that needs clients to see more than the weights (SCAFFOLD's
    server control variate) defines ``broadcast_extras(global_weights)``; the
    server puts its result in the broadcast's ``extras``.
    """
    method = getattr(aggregator, "broadcast_extras", None)
    if method is None:
        return {}
    return dict(method(global_weights))


def sorted_updates(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """Updates in sender order, the one order every aggregator computes in.

    Raises:
        AggregationError: two updates share a sender (they would be counted twice).
    """
    ordered = sorted(updates, key=lambda u: u.sender)
    for before, after in itertools.pairwise(ordered):
        if before.sender == after.sender:
            raise AggregationError(f"two updates from sender {after.sender!r}")
    return ordered


def cast_like(value: npt.NDArray[np.float64], like: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Cast a float64 result back to a model tensor's dtype (integers are rounded)."""
    if like.dtype == np.float64:
        return value
    if like.dtype.kind == "b":
        return value >= 0.5
    if like.dtype.kind in "iu":
        return np.rint(value).astype(like.dtype)
    return value.astype(like.dtype)

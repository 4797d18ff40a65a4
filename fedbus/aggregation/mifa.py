"""MIFA (Gu et al., NeurIPS 2021): stale updates stand in for the clients that are missing.

"Fast Federated Learning in the Presence of Arbitrary Device Unavailability"
keeps, on the server, the latest update of every client and moves the global
model by the average over *all* clients' latest updates, not only this
round's. A client that drops out of a round is then still represented by
what it last sent, so the average keeps the fleet's mix of data instead of
leaning toward whoever happened to answer (FedAvg's bias under dropout)::

    memory[i] <- dx_i            for each update i of this round
    x <- x + server_lr * sum_{i in memory} p_i memory[i]

with dx_i the update's change to the global model it started from (a
``delta`` update as is; a ``dense`` one minus the global weights given to
`Mifa.aggregate`, which in a synchronous round are the weights the client
trained from), and p_i = n_i / sum_j n_j over the memory (``weighting:
samples``, as FedAvg weighs) or 1 / |memory| (``weighting: uniform``, the
paper's plain mean).

``max_staleness`` bounds how long a stored update may stand in: one stored in
round r_i is forgotten in round r once r - r_i > max_staleness, so a client
that crashed for good stops steering the model (the paper's rule keeps it
forever: ``max_staleness: null``, the default). ``max_staleness: 0`` keeps
only this round's updates, which is FedAvg written as a mean delta.

The memory is the aggregator's state: `Mifa.state_dict` saves it as
``delta/<sender>/<tensor>`` float64 arrays plus ``examples/<sender>`` and
``round/<sender>``, so a checkpoint and ``--resume`` keep the stand-ins. It
costs one float64 copy of the model per client heard from (node ids never
contain ``/``, so the keys split unambiguously).

Arithmetic order is fixed by sender id (`sorted_updates`, then the memory in
sorted order, `weighted_sum` per tensor), so arrival order never changes a
bit; a round that raises `AggregationError` leaves the memory untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedbus.aggregation._util import (
    F64,
    check_updates,
    finish,
    float_param,
    int_param,
    weight_coeffs,
    weighting_param,
)
from fedbus.aggregation.base import DELTA, AggregationError, Arrays, ClientUpdate, sorted_updates
from fedbus.aggregation.mean import weighted_sum

__all__ = ["Mifa"]

_DELTA: Final = "delta/"
_EXAMPLES: Final = "examples/"
_ROUND: Final = "round/"


@dataclass(frozen=True, slots=True)
class _Stored:
    """One client's latest update: its delta per tensor (float64, read-only), n_k, its round."""

    delta: Mapping[str, F64]
    num_examples: int
    round: int


def _frozen(value: Any) -> F64:
    """A float64 copy nobody can write to, so `Mifa.state_dict` may hand it out uncopied."""
    arr = np.array(value, dtype=np.float64)
    arr.setflags(write=False)
    return arr


def _delta(update: ClientUpdate, global_weights: Arrays) -> dict[str, F64]:
    """The update's change to the model, per tensor, read-only float64.

    A ``delta`` update is copied (the caller keeps its arrays); a ``dense`` one
    minus the global weights is a fresh array already.
    """
    out: dict[str, F64] = {}
    for name, x in global_weights.items():
        if update.encoding == DELTA:
            arr = np.array(update.weights[name], dtype=np.float64)
        else:
            arr = np.asarray(update.weights[name], np.float64) - np.asarray(x, np.float64)
        arr.setflags(write=False)
        out[name] = arr
    return out


class Mifa:
    """MIFA: the mean of every client's latest update, stale ones standing in (module docstring).

    Args:
        server_lr: the step on the mean delta; 1.0 moves to the mean model.
        max_staleness: rounds a stored update may stand in after it arrived;
            None keeps it until the client sends another.
        weighting: ``samples`` (by num_examples, as FedAvg) or ``uniform``.
    """

    name: Final = "mifa"

    def __init__(
        self,
        server_lr: float = 1.0,
        max_staleness: int | None = None,
        weighting: str = "samples",
    ) -> None:
        self.weighting = weighting_param(weighting)
        self.server_lr = float_param(server_lr, "server_lr", low=0.0, low_open=True)
        self.max_staleness = (
            None if max_staleness is None else int_param(max_staleness, "max_staleness", minimum=0)
        )
        self._memory: dict[str, _Stored] = {}
        self.last_stand_ins: list[str] = []
        """Senders whose stored update stood in during the last aggregation."""
        self.last_forgotten: list[str] = []
        """Senders whose stored update the last aggregation dropped as too stale."""

    def aggregate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Store this round's deltas, forget the too stale, step by the memory's mean.

        Raises:
            AggregationError: no updates, an unknown encoding, two updates from
                one sender, or a stored update whose tensors do not fit the model
                (a checkpoint of another model).
        """
        ordered = sorted_updates(updates)
        check_updates(ordered, self.name)
        memory = dict(self._memory)
        forgotten = []
        fresh = {u.sender for u in ordered}
        for sender, stored in sorted(memory.items()):
            if sender in fresh:
                continue  # replaced below
            if self.max_staleness is not None and round - stored.round > self.max_staleness:
                forgotten.append(sender)
                del memory[sender]
            elif not _fits(stored.delta, global_weights):
                raise AggregationError(
                    f"mifa: the stored update of {sender} does not fit the model"
                )
        for u in ordered:
            memory[u.sender] = _Stored(_delta(u, global_weights), u.num_examples, round)
        senders = sorted(memory)
        coeffs, total = weight_coeffs(
            self.weighting, [memory[s].num_examples for s in senders], "mifa"
        )
        result: dict[str, F64] = {}
        for name, current in global_weights.items():
            mean = weighted_sum([memory[s].delta[name] for s in senders], coeffs)
            mean /= np.float64(total)
            if self.server_lr != 1.0:
                mean *= np.float64(self.server_lr)
            result[name] = np.asarray(current, dtype=np.float64) + mean
        self._memory = memory
        self.last_stand_ins = [s for s in senders if s not in fresh]
        self.last_forgotten = forgotten
        return finish(global_weights, result)

    def state_dict(self) -> dict[str, npt.NDArray[Any]]:
        """The memory: ``delta/<sender>/<tensor>``, ``examples/<sender>``, ``round/<sender>``.

        The delta arrays are the stored ones (read-only), not copies: a
        checkpoint after every round then costs no extra model copies.
        """
        state: dict[str, npt.NDArray[Any]] = {}
        for sender, stored in sorted(self._memory.items()):
            for name, arr in stored.delta.items():
                state[f"{_DELTA}{sender}/{name}"] = arr
            state[_EXAMPLES + sender] = np.array(stored.num_examples, np.int64)
            state[_ROUND + sender] = np.array(stored.round, np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        """Restore the memory saved by `state_dict`.

        Raises:
            AggregationError: a key `state_dict` never writes, or a sender
                missing its delta, sample count or round.
        """
        deltas: dict[str, dict[str, F64]] = {}
        examples: dict[str, int] = {}
        rounds: dict[str, int] = {}
        for key, arr in state.items():
            if key.startswith(_DELTA) and "/" in key[len(_DELTA) :]:
                sender, _, name = key[len(_DELTA) :].partition("/")
                deltas.setdefault(sender, {})[name] = _frozen(arr)
            elif key.startswith(_EXAMPLES):
                examples[key[len(_EXAMPLES) :]] = int(arr)
            elif key.startswith(_ROUND):
                rounds[key[len(_ROUND) :]] = int(arr)
            else:
                raise AggregationError(f"mifa cannot load state key {key!r}")
        if not set(deltas) == set(examples) == set(rounds):
            incomplete = sorted(set(deltas) ^ set(examples) | set(examples) ^ set(rounds))
            raise AggregationError(f"mifa state is incomplete for senders {incomplete}")
        self._memory = {s: _Stored(deltas[s], examples[s], rounds[s]) for s in sorted(deltas)}

    def stored_senders(self) -> list[str]:
        """The clients whose latest update is in memory, sorted."""
        return sorted(self._memory)


def _fits(delta: Mapping[str, F64], like: Arrays) -> bool:
    """Whether a stored delta has exactly the model's tensor names and shapes."""
    return set(delta) == set(like) and all(delta[n].shape == np.shape(a) for n, a in like.items())

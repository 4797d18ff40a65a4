"""SCAFFOLD (Karimireddy et al. 2020): control variates against client drift.

Both halves live here as pure numpy functions, so the server aggregator, the
client runtime and the one-process reference loop share the arithmetic.

Server (`Scaffold`, ``protocol.aggregator: {kind: scaffold, server_lr, num_clients,
weighting}``):
keeps the server control variate ``c`` (zeros at first, one tensor per model
tensor) and sends it down with every model as the broadcast's ``extras``
set ``"control"`` (`broadcast_extras`). Given the round's updates S, with
model deltas dy_i = y_i - x and control deltas dc_i (the update's ``extras``
set ``"control"``)::

    x <- x + server_lr * sum_i p_i dy_i
    c <- c + (1/N) * sum_i dc_i

with p_i = n_i / sum_j n_j (``weighting: samples``, the default, as FedAvg
weighs updates) or p_i = 1/|S| (``weighting: uniform``, the paper's mean).

N is ``num_clients`` when given, else the number of distinct senders this
aggregator has seen so far (the whole fleet once everyone has taken part).
An update without a ``"control"`` set (a client that ignores ``extras``, e.g.
firmware) counts as dc_i = 0: it is averaged into x like FedAvg's delta, and
does not move c. A ``"control"`` set whose names or shapes differ from the
model's is an `AggregationError`.

Client (`client_control_update`, option II of the paper): a client trains
with every gradient step corrected by ``c - c_i`` (`FitConfig.correction`),
K local steps of learning rate lr from x to y_i, then::

    c_i+ = c_i - c + (x - y_i) / (K * lr)        dc_i = c_i+ - c_i

Its c_i starts at zero and lives in the client runtime for the rest of the
run (`fedbus.nodes.client`); a client process that restarts starts again
from c_i = 0, which SCAFFOLD tolerates (it is a client seen for the first
time), and a new run starts from zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedbus.aggregation._util import (
    F64,
    check_updates,
    delta_vectors,
    finish,
    flatten,
    float_param,
    int_param,
    unflatten,
    weight_coeffs,
    weighting_param,
)
from fedbus.aggregation.base import AggregationError, Arrays, ClientUpdate, sorted_updates
from fedbus.aggregation.mean import weighted_sum

__all__ = ["CONTROL", "Scaffold", "client_control_update", "correction"]

CONTROL: Final = "control"
"""The ``extras`` set carrying c (in broadcasts) and dc_i (in updates)."""

_STATE_PREFIX: Final = "control/"
_SEEN_KEY: Final = "num_seen"


class Scaffold:
    """SCAFFOLD's server side: global step on x and update of c (module docstring).

    Args:
        server_lr: the global learning rate eta_g (1.0 takes the mean delta).
        num_clients: N, the fleet size the control variate is averaged over;
            None counts the distinct senders seen so far.
        weighting: "samples" (by num_examples, as FedAvg) or "uniform" (the
            paper's plain mean) for the model step.
    """

    name: Final = "scaffold"

    def __init__(
        self, server_lr: float = 1.0, num_clients: int | None = None, weighting: str = "samples"
    ) -> None:
        self.weighting = weighting_param(weighting)
        self.server_lr = float_param(server_lr, "server_lr", low=0.0, low_open=True)
        self.num_clients = (
            None if num_clients is None else int_param(num_clients, "num_clients", minimum=1)
        )
        self._control: dict[str, F64] | None = None
        self._seen: set[str] = set()
        self._seen_before = 0  # distinct senders counted before a resume

    def control(self, global_weights: Arrays) -> dict[str, F64]:
        """The server control variate c (float64; zeros shaped like the model at first)."""
        if self._control is None or list(self._control) != list(global_weights):
            self._control = {
                n: np.zeros(np.shape(a), np.float64) for n, a in global_weights.items()
            }
        return self._control

    def broadcast_extras(self, global_weights: Arrays) -> dict[str, Arrays]:
        """``{"control": c}`` in the model's dtypes, for the broadcast's ``extras``."""
        return {CONTROL: finish(global_weights, self.control(global_weights))}

    def aggregate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Return x + server_lr * mean(dy_i) and update c by sum(dc_i) / N.

        Raises:
            AggregationError: no updates, an unknown encoding, two updates from
                one sender, or a control set that does not fit the model.
        """
        del round
        ordered = sorted_updates(updates)
        check_updates(ordered, self.name)
        names = list(global_weights)
        for u in ordered:
            ctl = u.extras.get(CONTROL)
            if ctl is None:
                continue
            if list(ctl) != names:
                raise AggregationError(f"scaffold: {u.sender}'s control set names differ")
            for n in names:
                if np.shape(ctl[n]) != np.shape(global_weights[n]):
                    raise AggregationError(f"scaffold: {u.sender}'s control {n} has another shape")
        base = flatten(global_weights, names)
        deltas = delta_vectors(global_weights, ordered)
        coeffs, total = weight_coeffs(self.weighting, [u.num_examples for u in ordered], "scaffold")
        mean_dy = weighted_sum(list(deltas), coeffs) / np.float64(total)
        new_x = base + np.float64(self.server_lr) * mean_dy
        control = self.control(global_weights)
        self._seen.update(u.sender for u in ordered)
        fleet = self.num_clients or max(len(self._seen), self._seen_before)
        with_control = [flatten(u.extras[CONTROL], names) for u in ordered if CONTROL in u.extras]
        if with_control:
            dc = weighted_sum(with_control, [1.0] * len(with_control)) / np.float64(fleet)
            c = flatten(control, names) + dc
            self._control = {n: np.array(v) for n, v in unflatten(c, global_weights).items()}
        return finish(global_weights, unflatten(new_x, global_weights))

    def state_dict(self) -> dict[str, npt.NDArray[Any]]:
        """C as ``control/<tensor>`` float64 arrays, and the count of senders seen."""
        state: dict[str, npt.NDArray[Any]] = {}
        if self._control is not None:
            state = {_STATE_PREFIX + n: v.copy() for n, v in self._control.items()}
        state[_SEEN_KEY] = np.array(max(len(self._seen), self._seen_before), np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        """Restore c and the sender count saved by `state_dict`.

        Raises:
            AggregationError: a key that `state_dict` never writes.
        """
        unknown = [k for k in state if k != _SEEN_KEY and not k.startswith(_STATE_PREFIX)]
        if unknown:
            raise AggregationError(f"scaffold state has unknown keys {sorted(unknown)}")
        control = {
            k[len(_STATE_PREFIX) :]: np.array(v, np.float64)
            for k, v in state.items()
            if k.startswith(_STATE_PREFIX)
        }
        self._control = control or None
        self._seen_before = int(state.get(_SEEN_KEY, np.array(0)))


def correction(
    server_control: Arrays, client_control: Arrays | None
) -> dict[str, npt.NDArray[Any]]:
    """C - c_i per tensor, in c's dtypes (c_i None: a client's first round, c_i = 0)."""
    out: dict[str, npt.NDArray[Any]] = {}
    for n, c in server_control.items():
        arr = np.asarray(c)
        if client_control is None:
            out[n] = arr.copy()
        else:
            out[n] = (arr.astype(np.float64) - np.asarray(client_control[n], np.float64)).astype(
                arr.dtype
            )
    return out


def client_control_update(
    *,
    global_weights: Arrays,
    local_weights: Arrays,
    server_control: Arrays,
    client_control: Arrays | None,
    steps: int,
    lr: float,
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, npt.NDArray[Any]]]:
    """Option II: return (c_i+, dc_i) in the model's dtypes (module docstring).

    Args:
        global_weights: x, the model the round started from.
        local_weights: y_i, the weights after local training (dense).
        server_control: c as received.
        client_control: c_i before this round; None is zeros.
        steps: K, the number of local SGD steps taken (0 leaves c_i alone).
        lr: the local learning rate.
    """
    new: dict[str, npt.NDArray[Any]] = {}
    delta: dict[str, npt.NDArray[Any]] = {}
    for n, x in global_weights.items():
        like = np.asarray(x)
        ci = (
            np.zeros(like.shape, np.float64)
            if client_control is None
            else np.asarray(client_control[n], np.float64)
        )
        if steps <= 0:
            ci_new = ci
        else:
            drift = (like.astype(np.float64) - np.asarray(local_weights[n], np.float64)) / (
                np.float64(steps) * np.float64(lr)
            )
            ci_new = ci - np.asarray(server_control[n], np.float64) + drift
        new[n] = ci_new.astype(like.dtype)
        delta[n] = (ci_new - ci).astype(like.dtype)
    return new, delta

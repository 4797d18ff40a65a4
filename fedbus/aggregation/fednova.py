"""Aggregators that read client metrics: FedNova (local steps) and q-FedAvg (local loss).

Metrics clients must report (``ClientUpdate.metrics``; a trainer returns them
in ``FitResult.metrics``):

- FedNova: ``local_steps``, the number of local SGD steps the update took
  (epochs times batches per epoch for plain minibatch SGD). Configurable with
  ``steps_metric``.
- q-FedAvg: ``loss``, the loss of the *received* global model on the client's
  training data, measured before local training. Configurable with
  ``loss_metric``; it must be positive.

A missing or non-positive metric raises `AggregationError` naming the sender
and the key, so the round fails loudly rather than silently reweighting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedbus.aggregation._util import (
    Stateless,
    check_updates,
    delta_vectors,
    finish,
    flatten,
    float_param,
    unflatten,
)
from fedbus.aggregation.base import AggregationError, Arrays, ClientUpdate, sorted_updates

__all__ = ["FedNova", "QFedAvg"]


def _metric(update: ClientUpdate, key: str, who: str) -> float:
    value = update.metrics.get(key)
    if value is None or not np.isfinite(value) or value <= 0:
        raise AggregationError(
            f"{who} needs a positive metric {key!r} from every client; "
            f"{update.sender} sent {value!r}"
        )
    return float(value)


class FedNova(Stateless):
    """FedNova (Wang et al., "Tackling the Objective Inconsistency Problem...", NeurIPS 2020).

    Clients that take more local steps move further; plain FedAvg then
    optimises an objective skewed towards them. FedNova divides each delta by
    its step count ``tau_k`` and rescales the average by the effective step
    count ``tau_eff = sum_k p_k tau_k`` (``p_k = n_k / n``)::

        x <- x + server_lr * tau_eff * sum_k p_k (w_k - x) / tau_k

    This is the vanilla-SGD case of the paper (``|a_k|_1 = tau_k``). With
    equal step counts it is FedAvg.

    Args:
        server_lr: the server learning rate.
        steps_metric: the metric holding each client's local step count.
    """

    name: Final = "fednova"

    def __init__(self, server_lr: float = 1.0, steps_metric: str = "local_steps") -> None:
        self.server_lr = float_param(server_lr, "server_lr", low=0.0, low_open=True)
        self.steps_metric = str(steps_metric)

    def aggregate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Return the normalized average (class docstring).

        Raises:
            AggregationError: no updates, a missing step count, a zero total
                sample count, an unknown encoding, a repeated sender.
        """
        del round
        ordered = sorted_updates(updates)
        check_updates(ordered, self.name)
        total = float(sum(u.num_examples for u in ordered))
        if total <= 0:
            raise AggregationError("fednova needs a positive total num_examples")
        taus = np.array([_metric(u, self.steps_metric, self.name) for u in ordered])
        p = np.array([u.num_examples for u in ordered], np.float64) / total
        tau_eff = float(np.sum(p * taus))
        deltas = delta_vectors(global_weights, ordered)
        direction = np.sum((p / taus)[:, None] * deltas, axis=0)
        x = flatten(global_weights, list(global_weights))
        return finish(
            global_weights, unflatten(x + self.server_lr * tau_eff * direction, global_weights)
        )


class QFedAvg(Stateless):
    """q-FedAvg (Li et al., "Fair Resource Allocation in Federated Learning", ICLR 2020).

    Minimises ``sum_k F_k^(q+1) / (q+1)``, so clients with higher loss get more
    weight and accuracy is spread more evenly. With ``L = 1 / client_lr``::

        dw_k = L (x - w_k);   D_k = F_k^q dw_k
        h_k  = q F_k^(q-1) |dw_k|^2 + L F_k^q
        x   <- x - sum_k D_k / sum_k h_k

    ``q = 0`` is the unweighted mean of the clients' models.

    Args:
        q: fairness; larger spreads accuracy more evenly.
        client_lr: the clients' local learning rate (L = 1 / client_lr).
        loss_metric: the metric holding F_k (module docstring).
    """

    name: Final = "qfedavg"

    def __init__(self, q: float = 1.0, client_lr: float = 0.05, loss_metric: str = "loss") -> None:
        self.q = float_param(q, "q", low=0.0)
        self.client_lr = float_param(client_lr, "client_lr", low=0.0, low_open=True)
        self.loss_metric = str(loss_metric)

    def aggregate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Return the q-FedAvg step (class docstring).

        Raises:
            AggregationError: no updates, a missing or non-positive loss, an
                unknown encoding, a repeated sender.
        """
        del round
        ordered = sorted_updates(updates)
        check_updates(ordered, self.name)
        lip = 1.0 / self.client_lr
        losses = np.array([_metric(u, self.loss_metric, self.name) for u in ordered])
        dw = -lip * delta_vectors(global_weights, ordered)
        fq = losses**self.q
        sq_norms = np.sum(dw * dw, axis=1)
        h = lip * fq
        if self.q > 0:
            h = h + self.q * losses ** (self.q - 1.0) * sq_norms
        step = np.sum(fq[:, None] * dw, axis=0) / np.sum(h)
        x = flatten(global_weights, list(global_weights))
        return finish(global_weights, unflatten(x - step, global_weights))

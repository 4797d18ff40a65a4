"""Server optimizers on the pseudo-gradient: FedAvgM, FedAdagrad, FedAdam, FedYogi.

FedAvg's step ``x <- mean_k w_k`` is SGD with learning rate 1 on the
pseudo-gradient ``Delta = mean_k w_k - x``. Hsu et al. (2019, "Measuring the
Effects of Non-Identical Data Distribution...") add server momentum
(FedAvgM); Reddi et al. (ICLR 2021, "Adaptive Federated Optimization") replace
the step by Adagrad, Adam or Yogi, which helps on heterogeneous data.

The averaging that produces ``mean_k w_k`` is itself an aggregator (FedAvg by
default), so a robust one can sit inside: ``{kind: fedadam, inner: median}``.
The moments are the aggregator's state; `state_dict` returns them as named
float64 arrays (``m/<tensor>``, ``v/<tensor>``, ``step``) so a checkpoint
resumes exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedbus.aggregation._util import F64, PATH, finish, float_param
from fedbus.aggregation.base import AggregationError, Aggregator, Arrays, ClientUpdate
from fedbus.aggregation.mean import FedAvg
from fedbus.errors import ConfigError

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi"]


class _ServerOptimizer:
    """Shared bookkeeping: the inner average, the pseudo-gradient and the state."""

    name = "server_optimizer"
    slots: tuple[str, ...] = ()
    """State slots per tensor (``m``, ``v``)."""

    def __init__(self, inner: Aggregator | None) -> None:
        if inner is not None and not isinstance(inner, Aggregator):
            raise ConfigError(f"not an aggregator: {inner!r}", path=f"{PATH}.inner")
        self.inner: Aggregator = inner if inner is not None else FedAvg()
        self.step = 0
        self.state: dict[str, dict[str, F64]] = {slot: {} for slot in self.slots}

    def aggregate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Average with ``inner``, then take one optimizer step from the global model.

        Raises:
            AggregationError: whatever ``inner`` refuses.
        """
        averaged = self.inner.aggregate(global_weights, updates, round=round)
        self.step += 1
        result: dict[str, F64] = {}
        for name, current in global_weights.items():
            x = np.asarray(current, dtype=np.float64)
            delta = np.asarray(averaged[name], dtype=np.float64) - x
            for slot in self.slots:
                if name not in self.state[slot]:
                    self.state[slot][name] = self.initial(slot, x)
            result[name] = x + self.update(name, delta)
        return finish(global_weights, result)

    def initial(self, slot: str, like: F64) -> F64:
        """A slot's value before the first round."""
        del slot
        return np.zeros_like(like)

    def update(self, name: str, delta: F64) -> F64:
        """Advance tensor ``name``'s state by pseudo-gradient ``delta``; return the step to add."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, npt.NDArray[Any]]:
        """``step``, each slot's per-tensor arrays and the inner aggregator's state (``inner/``)."""
        out: dict[str, npt.NDArray[Any]] = {"step": np.array(self.step, np.int64)}
        for slot, tensors in self.state.items():
            for name, arr in tensors.items():
                out[f"{slot}/{name}"] = arr.copy()
        for key, arr in self.inner.state_dict().items():
            out[f"inner/{key}"] = arr
        return out

    def load_state_dict(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        """Restore what `state_dict` saved.

        Raises:
            AggregationError: a key this optimizer does not keep.
        """
        loaded: dict[str, dict[str, F64]] = {slot: {} for slot in self.slots}
        inner: dict[str, npt.NDArray[Any]] = {}
        step = 0
        for key, arr in state.items():
            slot, _, name = key.partition("/")
            if key == "step":
                step = int(arr)
            elif slot == "inner" and name:
                inner[name] = arr
            elif slot in loaded and name:
                loaded[slot][name] = np.array(arr, dtype=np.float64)
            else:
                raise AggregationError(f"{self.name} cannot load state key {key!r}")
        self.inner.load_state_dict(inner)
        self.step = step
        self.state = loaded


class FedAvgM(_ServerOptimizer):
    """FedAvg with server momentum (Hsu et al., 2019): ``v <- b v + D; x <- x + lr v``.

    Args:
        server_lr: the server learning rate; 1 with momentum 0 is FedAvg.
        momentum: b, in [0, 1).
        inner: the averaging aggregator; FedAvg by default.
    """

    name: Final = "fedavgm"
    slots = ("momentum",)

    def __init__(
        self, server_lr: float = 1.0, momentum: float = 0.9, inner: Aggregator | None = None
    ) -> None:
        self.server_lr = float_param(server_lr, "server_lr", low=0.0, low_open=True)
        self.momentum = float_param(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        super().__init__(inner)

    def update(self, name: str, delta: F64) -> F64:
        """Momentum step."""
        v = self.state["momentum"][name]
        v *= self.momentum
        v += delta
        return self.server_lr * v


class _Adaptive(_ServerOptimizer):
    """Reddi et al.'s Algorithm 2, parametrised by the second-moment rule."""

    slots = ("m", "v")

    # One signature and one set of defaults for the whole family (Reddi et al.'s
    # recommended values); subclasses differ only in their second moment.
    def __init__(
        self,
        eta: float = 1e-2,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        inner: Aggregator | None = None,
    ) -> None:
        self.eta = float_param(eta, "eta", low=0.0, low_open=True)
        self.beta_1 = float_param(beta_1, "beta_1", low=0.0, high=1.0, high_open=True)
        self.beta_2 = float_param(beta_2, "beta_2", low=0.0, high=1.0, high_open=True)
        self.tau = float_param(tau, "tau", low=0.0, low_open=True)
        super().__init__(inner)

    def initial(self, slot: str, like: F64) -> F64:
        """``v`` starts at tau**2 (Reddi et al.: v_{-1} >= tau^2), ``m`` at 0."""
        return np.full_like(like, self.tau**2 if slot == "v" else 0.0)

    def second_moment(self, v: F64, delta_sq: F64) -> None:
        """Update ``v`` in place from the squared pseudo-gradient."""
        raise NotImplementedError

    def update(self, name: str, delta: F64) -> F64:
        """Adaptive step ``eta * m / (sqrt(v) + tau)``."""
        m = self.state["m"][name]
        v = self.state["v"][name]
        m *= self.beta_1
        m += (1.0 - self.beta_1) * delta
        self.second_moment(v, delta * delta)
        return self.eta * m / (np.sqrt(v) + self.tau)


class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al., ICLR 2021): ``v <- v + D^2``.

    Args:
        eta: server learning rate.
        beta_1: first-moment decay.
        beta_2: unused by Adagrad; accepted so the FedOpt family shares one signature.
        tau: adaptivity (added to sqrt(v)).
        inner: the averaging aggregator; FedAvg by default.
    """

    name: Final = "fedadagrad"

    def second_moment(self, v: F64, delta_sq: F64) -> None:
        """Adagrad accumulates."""
        v += delta_sq


class FedAdam(_Adaptive):
    """FedAdam (Reddi et al., ICLR 2021): ``v <- b2 v + (1 - b2) D^2``, no bias correction.

    Args:
        eta: server learning rate (the paper's default grid centres on 1e-2).
        beta_1: first-moment decay.
        beta_2: second-moment decay.
        tau: adaptivity; the paper recommends 1e-3.
        inner: the averaging aggregator; FedAvg by default.
    """

    name: Final = "fedadam"

    def second_moment(self, v: F64, delta_sq: F64) -> None:
        """Exponential moving average."""
        v *= self.beta_2
        v += (1.0 - self.beta_2) * delta_sq


class FedYogi(_Adaptive):
    """FedYogi (Reddi et al., ICLR 2021): ``v <- v - (1 - b2) D^2 sign(v - D^2)``.

    Yogi moves v additively, so a burst of large pseudo-gradients raises the
    step size less abruptly than Adam.

    Args:
        eta: server learning rate.
        beta_1: first-moment decay.
        beta_2: second-moment rate.
        tau: adaptivity.
        inner: the averaging aggregator; FedAvg by default.
    """

    name: Final = "fedyogi"

    def second_moment(self, v: F64, delta_sq: F64) -> None:
        """Yogi's sign-controlled additive update."""
        v -= (1.0 - self.beta_2) * delta_sq * np.sign(v - delta_sq)

"""Model poisoning: what a Byzantine client sends instead of its honest update.

Every function takes the global weights the round started from and returns
the *dense* weights the attacker sends (the global model plus a malicious
delta), in the global model's dtypes, so the result travels in either
encoding. Attacks are defined on the delta ``honest - global``:

- `sign_flip`: ``scale * delta`` with scale -4 (Blades and FLANDERS use
  negative multiples; -4 outweighs four honest clients in a mean).
- `gaussian`: a delta drawn from N(mean, std) per coordinate, N(0, 1) by
  default (Blanchard et al. 2017's Gaussian Byzantine worker).
- `scale_update`: model replacement (Bagdasaryan et al., "How To Backdoor
  Federated Learning", AISTATS 2020): ``delta * gamma`` with gamma = n / eta,
  so that after the server averages n updates with learning rate eta the
  attacker's model replaces the global one.
- `alie`: "A Little Is Enough" (Baruch et al., NeurIPS 2019): per coordinate
  ``mean - z * std`` of the honest deltas, with z from `alie_z`, small enough
  to hide inside the honest spread yet consistently biased.
- `ipm`: inner-product manipulation (Xie et al., "Fall of Empires", UAI
  2019): ``-epsilon * mean`` of the honest deltas; epsilon 0.1 slips past
  median and Krum, epsilon 100 reverses the aggregate's direction.
- `free_rider`: the global model back, optionally plus small noise
  (Lin et al., "Free-riders in Federated Learning", 2019).

Omniscient attacks (ALIE, IPM) see the honest updates of the round (``peers``).
Randomness comes only from the numpy Generator passed in.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["alie", "alie_z", "free_rider", "gaussian", "ipm", "scale_update", "sign_flip"]

Arrays = Mapping[str, npt.NDArray[Any]]
F64 = npt.NDArray[np.float64]


def _delta(weights: Arrays, global_weights: Arrays) -> dict[str, F64]:
    return {
        name: np.asarray(weights[name], np.float64) - np.asarray(g, np.float64)
        for name, g in global_weights.items()
    }


def _send(global_weights: Arrays, delta: Mapping[str, F64]) -> dict[str, npt.NDArray[Any]]:
    out: dict[str, npt.NDArray[Any]] = {}
    for name, g in global_weights.items():
        current = np.asarray(g)
        out[name] = (current.astype(np.float64) + delta[name]).astype(current.dtype)
    return out


def _peer_stack(peers: Sequence[Arrays], global_weights: Arrays, name: str) -> F64:
    if not peers:
        raise ValueError("this attack needs the honest updates of the round (peers)")
    g = np.asarray(global_weights[name], np.float64)
    return np.stack([np.asarray(p[name], np.float64) - g for p in peers])


def sign_flip(
    honest: Arrays, global_weights: Arrays, *, scale: float = -4.0
) -> dict[str, npt.NDArray[Any]]:
    """Send ``global + scale * (honest - global)``; -4 by default."""
    delta = _delta(honest, global_weights)
    return _send(global_weights, {k: np.float64(scale) * v for k, v in delta.items()})


def gaussian(
    global_weights: Arrays, *, rng: np.random.Generator, mean: float = 0.0, std: float = 1.0
) -> dict[str, npt.NDArray[Any]]:
    """Send ``global + N(mean, std)`` per coordinate; N(0, 1) by default."""
    delta = {
        name: rng.normal(mean, std, size=np.shape(g)).astype(np.float64)
        for name, g in global_weights.items()
    }
    return _send(global_weights, delta)


def scale_update(
    honest: Arrays, global_weights: Arrays, *, scale: float
) -> dict[str, npt.NDArray[Any]]:
    """Send ``global + scale * (honest - global)`` (model replacement with scale n / eta)."""
    delta = _delta(honest, global_weights)
    return _send(global_weights, {k: np.float64(scale) * v for k, v in delta.items()})


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max: ``s = floor(n/2 + 1) - f``; ``z = Phi^-1((n - s) / n)``.

    s is how many honest clients the attackers need "on their side" for a
    majority; z is the largest shift that keeps that many honest values
    beyond the malicious one. For n = 20, f = 4: s = 7, z = Phi^-1(0.65) = 0.385.

    Raises:
        ValueError: n < 1, f outside [0, n], or a bound that leaves no valid z.
    """
    if n < 1 or not 0 <= f <= n:
        raise ValueError(f"alie_z needs n >= 1 and 0 <= f <= n, got n={n}, f={f}")
    s = (n // 2 + 1) - f
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        raise ValueError(f"alie_z: (n - s) / n = {p} for n={n}, f={f}; pass z explicitly")
    return statistics.NormalDist().inv_cdf(p)


def alie(
    peers: Sequence[Arrays], global_weights: Arrays, *, z: float
) -> dict[str, npt.NDArray[Any]]:
    """Send ``global + mean - z * std`` of the honest deltas, per coordinate."""
    delta = {}
    for name in global_weights:
        stack = _peer_stack(peers, global_weights, name)
        delta[name] = np.mean(stack, axis=0) - np.float64(z) * np.std(stack, axis=0)
    return _send(global_weights, delta)


def ipm(
    peers: Sequence[Arrays], global_weights: Arrays, *, epsilon: float = 0.1
) -> dict[str, npt.NDArray[Any]]:
    """Send ``global - epsilon * mean`` of the honest deltas."""
    delta = {
        name: -np.float64(epsilon) * np.mean(_peer_stack(peers, global_weights, name), axis=0)
        for name in global_weights
    }
    return _send(global_weights, delta)


def free_rider(
    global_weights: Arrays, *, rng: np.random.Generator | None = None, noise_std: float = 0.0
) -> dict[str, npt.NDArray[Any]]:
    """Send the global model back, plus N(0, noise_std) per coordinate when noise_std > 0."""
    if noise_std > 0:
        if rng is None:
            raise ValueError("free_rider with noise needs a Generator")
        delta = {
            name: rng.normal(0.0, noise_std, size=np.shape(g)) for name, g in global_weights.items()
        }
    else:
        delta = {name: np.zeros(np.shape(g)) for name, g in global_weights.items()}
    return _send(global_weights, delta)

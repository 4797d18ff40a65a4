"""Defenses at a gossip peer: screen neighbours' models, combine them robustly (issue 5).

A gossip peer is an aggregating node too: each round it combines its own
trained model with its neighbours' models. Metropolis-Hastings weights are a
weighted mean, so one Byzantine neighbour sending noise (or -4x its update)
drags the peer as far as it likes, and through it the whole graph. The same
two defenses as at a server apply, through the same interfaces:

- validators (`fedbus.aggregation.Validator`, ``protocol.validators``)
  judge the round's neighbour models against the peer's own trained model,
  which plays the global model's part: a norm outlier is a neighbour whose
  distance from us is an outlier among our neighbours' distances, a cosine
  outlier one whose direction from us disagrees with theirs. A rejected
  model is left out of the round (its Metropolis weight stays with the peer,
  as for a missing neighbour). The statistics need ``min_updates``
  neighbours (3 by default), so on a ring (degree 2) they never fire: use a
  robust rule there.
- a robust rule (``protocol.aggregator`` other than the default):
  - ``norm_clipping`` is clipped gossip (He, Karimireddy and Jaggi 2022,
    "Byzantine-robust decentralized learning via ClippedGossip"): each
    neighbour's difference from our own model is clipped to a norm bound
    ``tau`` before the usual Metropolis mix, ``x_i + sum_j W_ij clip(x_j -
    x_i, tau)``. ``tau`` is ``max_norm`` if given, else ``multiplier`` times
    the lower median of the neighbours' distances from us, which fewer than
    half of them cannot raise: a Byzantine neighbour moves us by at most
    ``W_ij * tau`` per round, while honest neighbours inside the bound mix as
    before, so the honest peers still reach consensus.
  - any other rule (``median``, ``trimmed_mean``, ``krum``...) is applied
    to our own model and the kept neighbour models, one vote each
    (``num_examples`` 1, dense), instead of the Metropolis mix (the
    coordinate-wise screening of BRIDGE, Yang and Bajwa 2019). A minority of
    Byzantine neighbours cannot move a coordinate outside the honest range,
    but the mix no longer keeps the network average, and on sparse graphs
    (a ring: median of 3) the honest peers stop agreeing: a path of
    distinct values is a fixed point of the median.

Pure and deterministic: models are ordered by sender before any arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.aggregation import (
    AggregationError,
    Aggregator,
    Arrays,
    ClientUpdate,
    NormClipping,
    Validator,
    cast_like,
)

__all__ = ["PeerDefense"]


def _updates(models: Mapping[str, Arrays], round_: int) -> list[ClientUpdate]:
    return [
        ClientUpdate(sender=k, weights=models[k], num_examples=1, round=round_)
        for k in sorted(models)
    ]


def _flat(model: Arrays, names: list[str]) -> npt.NDArray[np.float64]:
    return np.concatenate([np.asarray(model[k], dtype=np.float64).reshape(-1) for k in names])


def _unflat(vector: npt.NDArray[np.float64], like: Arrays) -> dict[str, Any]:
    out: dict[str, Any] = {}
    start = 0
    for name, ref in like.items():
        ref = np.asarray(ref)
        out[name] = cast_like(vector[start : start + ref.size].reshape(ref.shape), ref)
        start += ref.size
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerDefense:
    """How one peer screens and combines models (see the module docstring).

    Attributes:
        aggregator: the robust rule replacing the Metropolis mix (None: Metropolis).
        validators: run in order over the neighbours' models of a round.
    """

    aggregator: Aggregator | None = None
    validators: Sequence[Validator] = ()

    @property
    def active(self) -> bool:
        """Whether this changes anything over plain Metropolis mixing."""
        return self.aggregator is not None or bool(self.validators)

    @property
    def clips(self) -> bool:
        """Whether the rule is clipped gossip (`clip`, then Metropolis) rather than `combine`."""
        return isinstance(self.aggregator, NormClipping)

    def clip(self, own: Arrays, models: Mapping[str, Arrays]) -> dict[str, dict[str, Any]]:
        """Each model moved to within ``tau`` of ``own`` (see the module docstring).

        Returns the models to mix in place of ``models``, as ``own + clip(model - own)``.
        """
        assert isinstance(self.aggregator, NormClipping)
        if not models:
            return {}
        names = list(own)
        base = _flat(own, names)
        deltas = {k: _flat(models[k], names) - base for k in sorted(models)}
        norms = sorted(float(np.sqrt(np.sum(d * d))) for d in deltas.values())
        tau = self.aggregator.max_norm
        if tau is None:
            tau = self.aggregator.multiplier * norms[(len(norms) - 1) // 2]
        out: dict[str, dict[str, Any]] = {}
        for k, delta in deltas.items():
            norm = float(np.sqrt(np.sum(delta * delta)))
            if norm > tau:
                delta = delta * (tau / norm)
            out[k] = _unflat(base + delta, own)
        return out

    def screen(self, own: Arrays, models: Mapping[str, Arrays], *, round: int) -> dict[str, str]:
        """``{sender: reason}`` for each neighbour model the validators reject.

        A validator that cannot judge the round (`AggregationError`) rejects nothing.
        """
        remaining = _updates(models, round)
        out: dict[str, str] = {}
        for validator in self.validators:
            try:
                verdicts = validator.validate(own, remaining, round=round)
            except AggregationError:
                continue
            for sender in sorted(verdicts):
                out.setdefault(sender, verdicts[sender])
            remaining = [u for u in remaining if u.sender not in verdicts]
        return out

    def combine(
        self, models: Mapping[str, Arrays], *, like: Arrays, round: int
    ) -> dict[str, Any] | None:
        """The aggregator over ``models`` (own included), cast like ``like``.

        None when there is no aggregator or it cannot combine these models
        (a bound such as Krum's ``n > 2f + 2`` with too few neighbours
        present); the caller then falls back to its plain rule.
        """
        if self.aggregator is None or not models:
            return None
        try:
            result = self.aggregator.aggregate(like, _updates(models, round), round=round)
        except AggregationError:
            return None
        return {k: cast_like(np.asarray(result[k], dtype=np.float64), np.asarray(v))
                for k, v in like.items()}  # fmt: skip

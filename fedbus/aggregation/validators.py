"""Update validators: the FedML paper's defenses 1 and 2, before any aggregation.

He et al. ("FedML: A Research Library and Benchmark for Federated Machine
Learning", 2020) name three server-side defenses against poisoning: check
each update's effect on a validation set, check the statistics of the
updates, and aggregate robustly. The third lives in `fedbus.aggregation`;
these are the first two, behind the `Validator` interface so that a central
server, an edge aggregator or a gossip peer runs them the same way:

- `AccuracyGate` (``validation_accuracy``, in `fedbus.aggregation.accuracy_gate`):
  the node holds a small validation set, disjoint from the test split, and
  rejects an update whose marginal effect on the global model (applied at
  its FedAvg weight) worsens validation loss far beyond the round's median.
- `NormOutlier` (``norm_outlier``): an update whose delta norm lies more than
  ``sigmas`` standard deviations from the round's centre.
- `CosineOutlier` (``cosine_outlier``): an update pointing away from the
  round's mean (or median) update or from the previous global step.

The outlier checks estimate centre and spread robustly by default (median,
1.4826 * MAD): with a classical mean and standard deviation, a coalition of
20% identical outliers caps its own z-score at sqrt(0.8 / 0.2) = 2 and a
3-sigma rule never fires. Every check is a deterministic function of the
sorted round (plus, for ``previous``, the last global model seen, and for
the gate's ``history``, each sender's running score).

State across rounds that a resumed run should keep (the gate's history) is
exposed by `validator_state` and `load_validator_state` as named arrays,
like an aggregator's `state_dict`; the FedAvg server keeps them in its
checkpoint beside the aggregator's state (`FedAvgServer.from_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedbus.aggregation._util import F64, check_updates, delta_vectors, flatten, float_param
from fedbus.aggregation.accuracy_gate import AccuracyGate
from fedbus.aggregation.base import (
    AggregationError,
    Aggregator,
    Arrays,
    ClientUpdate,
    Validator,
    sorted_updates,
)
from fedbus.errors import ConfigError

__all__ = [
    "LEVEL_VALIDATOR_PREFIX",
    "VALIDATORS",
    "AccuracyGate",
    "CosineOutlier",
    "NormOutlier",
    "ValidatorChain",
    "level_state",
    "load_level_state",
    "load_validator_state",
    "make_validator",
    "make_validators",
    "validator_state",
]

_PATH = "protocol.validators"


def _spread(values: F64, robust: bool, min_rel_scale: float) -> tuple[float, float]:
    """Centre and scale of ``values``; the scale is floored at ``min_rel_scale * |centre|``."""
    if robust:
        centre = float(np.median(values))
        scale = 1.4826 * float(np.median(np.abs(values - centre)))
    else:
        centre = float(np.mean(values))
        scale = float(np.std(values))
    return centre, max(scale, min_rel_scale * abs(centre), 1e-12)


class NormOutlier:
    """Reject updates whose delta norm is a ``sigmas``-sigma outlier in the round (both sides).

    Too large is the boosted backdoor or a noise attack; too small is a free
    rider sending the global model back.

    Args:
        sigmas: the threshold in (robust) standard deviations.
        robust: median and MAD instead of mean and standard deviation.
        min_rel_scale: floor on the spread as a fraction of the centre, so a
            round of near-identical norms does not reject tiny differences.
        min_updates: below this many updates nothing is rejected (no statistics).
    """

    name: Final = "norm_outlier"

    def __init__(
        self,
        sigmas: float = 3.0,
        robust: bool = True,
        min_rel_scale: float = 0.05,
        min_updates: int = 3,
    ) -> None:
        self.sigmas = float_param(sigmas, "sigmas", low=0.0, low_open=True, path=_PATH)
        self.robust = bool(robust)
        self.min_rel_scale = float_param(min_rel_scale, "min_rel_scale", low=0.0, path=_PATH)
        self.min_updates = int(float_param(min_updates, "min_updates", low=1, path=_PATH))
        self.last_norms: dict[str, float] = {}

    def validate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, str]:
        """Reject the round's norm outliers."""
        del round
        ordered = sorted_updates(updates)
        if len(ordered) < self.min_updates:
            return {}
        check_updates(ordered, self.name)
        deltas = delta_vectors(global_weights, ordered)
        norms = np.sqrt(np.sum(deltas * deltas, axis=1))
        self.last_norms = {u.sender: float(n) for u, n in zip(ordered, norms, strict=True)}
        finite = np.isfinite(norms)
        if not finite.any():
            return {u.sender: self.name for u in ordered}
        # A NaN or infinite norm is rejected outright (any comparison with NaN
        # is False, so it would pass), and kept out of the round's statistics.
        centre, scale = _spread(norms[finite], self.robust, self.min_rel_scale)
        return {
            u.sender: self.name
            for u, n, ok in zip(ordered, norms, finite, strict=True)
            if not ok or abs(n - centre) > self.sigmas * scale
        }


class CosineOutlier:
    """Reject updates whose direction disagrees with the round or with the last global step.

    Args:
        reference: ``mean`` (the round's unweighted mean delta), ``median``
            (its coordinate-wise median, which attackers cannot drag) or
            ``previous`` (the last global step, global_t - global_{t-1}; the
            first round seen passes everything).
        sigmas: reject cosines more than this many (robust) standard
            deviations below the round's centre.
        min_cosine: also reject any cosine below this, if given.
        robust: median and MAD instead of mean and standard deviation.
        min_scale: floor on the spread, in cosine units: honest cosines often
            cluster within 0.01, and a 3-sigma rule on such a tight cluster
            would reject its natural tail.
        min_updates: below this many updates nothing is rejected.
    """

    name: Final = "cosine_outlier"

    def __init__(
        self,
        reference: str = "mean",
        sigmas: float = 3.0,
        min_cosine: float | None = None,
        robust: bool = True,
        min_scale: float = 0.05,
        min_updates: int = 3,
    ) -> None:
        if reference not in ("mean", "median", "previous"):
            raise ConfigError(
                f"must be mean, median or previous, got {reference!r}", path=f"{_PATH}.reference"
            )
        self.reference = reference
        self.sigmas = float_param(sigmas, "sigmas", low=0.0, low_open=True, path=_PATH)
        self.min_cosine = (
            None
            if min_cosine is None
            else float_param(min_cosine, "min_cosine", low=-1.0, high=1.0, path=_PATH)
        )
        self.robust = bool(robust)
        self.min_scale = float_param(min_scale, "min_scale", low=0.0, path=_PATH)
        self.min_updates = int(float_param(min_updates, "min_updates", low=1, path=_PATH))
        self._previous: tuple[int, F64] | None = None
        self.last_cosines: dict[str, float] = {}

    def validate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, str]:
        """Reject the round's low-cosine outliers."""
        ordered = sorted_updates(updates)
        current = flatten(global_weights, list(global_weights))
        previous = self._previous
        if previous is None or previous[0] < round:
            self._previous = (round, current)
        if len(ordered) < self.min_updates:
            return {}
        check_updates(ordered, self.name)
        deltas = delta_vectors(global_weights, ordered)
        # An update with a NaN or infinite coordinate is rejected outright: its
        # cosine is NaN, which passes any comparison, and it would poison the
        # reference direction of every other update.
        finite_rows = np.asarray(np.isfinite(deltas).all(axis=1), dtype=bool)
        out: dict[str, str] = {
            u.sender: self.name for u, ok in zip(ordered, finite_rows, strict=True) if not ok
        }
        if not finite_rows.all():
            ordered = [u for u, ok in zip(ordered, finite_rows, strict=True) if ok]
            deltas = deltas[finite_rows]
            if len(ordered) < self.min_updates:
                return out
        if self.reference == "mean":
            ref = np.sum(deltas, axis=0) / np.float64(len(deltas))
        elif self.reference == "median":
            ref = np.median(deltas, axis=0)
        else:
            if previous is None or previous[0] >= round or previous[1].shape != current.shape:
                return out
            ref = current - previous[1]
        ref_norm = float(np.sqrt(np.sum(ref * ref)))
        norms = np.sqrt(np.sum(deltas * deltas, axis=1))
        denom = np.maximum(norms * ref_norm, 1e-300)
        cos = np.where(norms * ref_norm > 0, np.sum(deltas * ref, axis=1) / denom, 0.0)
        self.last_cosines = {u.sender: float(c) for u, c in zip(ordered, cos, strict=True)}
        centre, scale = _spread(cos, self.robust, 0.0)
        scale = max(scale, self.min_scale)
        for u, c in zip(ordered, cos, strict=True):
            if c < centre - self.sigmas * scale or (
                self.min_cosine is not None and c < self.min_cosine
            ):
                out[u.sender] = self.name
        return out


class ValidatorChain:
    """Run validators in order; each sees only the updates the earlier ones passed.

    The first reason given for a sender is the one reported, so the order of
    the chain decides how rejections are counted in ``metrics.jsonl``.
    """

    name: Final = "chain"

    def __init__(self, validators: Sequence[Validator]) -> None:
        self.validators = tuple(validators)

    def validate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, str]:
        """Merged ``{sender: reason}`` of every validator in the chain."""
        remaining = sorted_updates(updates)
        out: dict[str, str] = {}
        for validator in self.validators:
            verdicts = validator.validate(global_weights, remaining, round=round)
            for sender in sorted(verdicts):
                out.setdefault(sender, verdicts[sender])
            remaining = [u for u in remaining if u.sender not in verdicts]
        return out

    def state_dict(self) -> dict[str, npt.NDArray[Any]]:
        """The chained validators' state (`validator_state`)."""
        return validator_state(self.validators)

    def load_state_dict(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        """Restore what `state_dict` saved (`load_validator_state`)."""
        load_validator_state(self.validators, state)


def validator_state(validators: Sequence[Validator]) -> dict[str, npt.NDArray[Any]]:
    """``<index>/<key>`` -> array for each validator in the list that keeps state.

    A validator keeps state when it has ``state_dict`` (the gate's history);
    the index is its position in ``protocol.validators``, so a checkpoint
    restores into the same list built from the same topology.
    """
    out: dict[str, npt.NDArray[Any]] = {}
    for i, validator in enumerate(validators):
        save = getattr(validator, "state_dict", None)
        if callable(save):
            out.update({f"{i}/{key}": value for key, value in save().items()})
    return out


def load_validator_state(
    validators: Sequence[Validator], state: Mapping[str, npt.NDArray[Any]]
) -> None:
    """Give each validator its part of a `validator_state` mapping.

    Raises:
        AggregationError: a key names no stateful validator of the list.
    """
    parts: dict[int, dict[str, npt.NDArray[Any]]] = {}
    for key, value in state.items():
        index, _, rest = key.partition("/")
        i = int(index) if index.isdigit() else -1
        if not 0 <= i < len(validators) or not callable(
            getattr(validators[i], "load_state_dict", None)
        ):
            raise AggregationError(f"validator state {key!r} names no stateful validator")
        parts.setdefault(i, {})[rest] = value
    for i, validator in enumerate(validators):
        load = getattr(validator, "load_state_dict", None)
        if callable(load):
            load(parts.get(i, {}))


VALIDATORS: dict[str, Callable[..., Validator]] = {
    "cosine_outlier": CosineOutlier,
    "norm_outlier": NormOutlier,
    "validation_accuracy": AccuracyGate,
}
"""Name -> constructor taking the spec's parameters as keyword arguments."""


def make_validator(spec: str | Mapping[str, Any] | Validator, *, index: int = 0) -> Validator:
    """Build one validator from a name, ``{kind, params...}`` or an instance.

    Raises:
        ConfigError: naming ``protocol.validators[index]``.
    """
    path = f"{_PATH}[{index}]"
    if isinstance(spec, Validator):
        return spec
    if isinstance(spec, str):
        kind, params = spec, {}
    elif isinstance(spec, Mapping):
        params = dict(spec)
        kind = params.pop("kind", None)
        nested = params.pop("params", None)
        if isinstance(nested, Mapping):
            params.update(nested)
        elif nested is not None:
            raise ConfigError("params must be a mapping", path=f"{path}.params")
    else:
        raise ConfigError(f"expected a name or a mapping, got {type(spec).__name__}", path=path)
    if kind not in VALIDATORS:
        known = ", ".join(sorted(VALIDATORS))
        raise ConfigError(f"unknown validator {kind!r}; known: {known}", path=f"{path}.kind")
    try:
        return VALIDATORS[kind](**params)
    except ConfigError as exc:
        raise ConfigError(
            exc.message, path=exc.path.replace(_PATH, path, 1) if exc.path else path
        ) from exc
    except TypeError as exc:
        raise ConfigError(f"cannot build validator {kind!r}: {exc}", path=path) from exc


def make_validators(specs: Sequence[str | Mapping[str, Any] | Validator]) -> list[Validator]:
    """Build ``protocol.validators`` (a list; the server runs them in order)."""
    return [make_validator(spec, index=i) for i, spec in enumerate(specs)]


LEVEL_VALIDATOR_PREFIX: Final = "validators/"
"""Where stateful validators' arrays sit in an aggregating level's kept state."""


def level_state(
    aggregator: Aggregator, validators: Sequence[Validator]
) -> dict[str, npt.NDArray[Any]]:
    """What an aggregating level (server, edge) keeps across a restart, in one mapping.

    The aggregator's ``state_dict`` plus `validator_state` under
    `LEVEL_VALIDATOR_PREFIX`: checkpoint formats that store an aggregator's
    state carry the validators' without a new field, and an older checkpoint
    restores none (`load_level_state`).
    """
    state = dict(aggregator.state_dict())
    for key, value in validator_state(validators).items():
        state[LEVEL_VALIDATOR_PREFIX + key] = value
    return state


def load_level_state(
    aggregator: Aggregator,
    validators: Sequence[Validator],
    state: Mapping[str, npt.NDArray[Any]],
) -> None:
    """Restore a `level_state` mapping; validators stay fresh when it holds none of theirs.

    Raises:
        AggregationError: a validator key names no stateful validator.
    """
    own: dict[str, npt.NDArray[Any]] = {}
    screens: dict[str, npt.NDArray[Any]] = {}
    for key, value in state.items():
        if key.startswith(LEVEL_VALIDATOR_PREFIX):
            screens[key.removeprefix(LEVEL_VALIDATOR_PREFIX)] = value
        else:
            own[key] = value
    aggregator.load_state_dict(own)
    if screens:
        load_validator_state(validators, screens)

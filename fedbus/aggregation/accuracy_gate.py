"""The validation gate (FedML's defense 1), scored by marginal contribution.

He et al. describe the server checking each update against a small
validation set and rejecting updates that lower accuracy beyond a threshold.
Scoring each client's *own* model (``mode: full``) fails on non-IID data: a
client that holds two or three classes trains a model far below the global
one, so honest updates are rejected with the poisoned ones.

The default ``marginal`` mode instead asks what the update does to the
global model at the weight it would get: it evaluates
``global + w_k * (update_k - global)``, with ``w_k = n_k / sum n`` (FedAvg's
weight), and compares it with the global model. That is a finite-difference
version of the validation gradient's inner product with the update, as in
Zeno++ (Xie et al., ICML 2020). An honest update, whatever its classes,
barely moves the validation loss at 1/n of its size; a label-flipped or
sign-flipped one raises it. Two rules, either of which rejects:

- ``sigmas``: the update worsens the validation metric *and* lies more than
  ``sigmas`` robust deviations (1.4826 * MAD) above the round's median
  worsening. Relative to the round, so it adapts to the stage of training.
- ``max_drop``: the update worsens the metric by more than this, absolutely.

The metric is the validation loss by default: at 1/n of an update's size
the accuracy of a small validation set rarely moves by one example, while
the loss moves continuously. The score needs ``n + 1`` evaluations of the
validation set per round.

One round is thin evidence. On digits with 20 Dirichlet(0.5) clients a
damaging label flipper scores about 1.3 robust deviations on average but
only about 1.0 in a given round, where the most suspicious honest client
reaches 0.93: no per-round threshold separates them. Clients persist across
rounds, so ``history`` accumulates each sender's round score (its robust
z-score, clipped to +-3) into a running mean, the evidence principle of
FoolsGold and reputation-based FL. Honest non-IID clients do not average
to zero (a client holding two classes is persistently above or below the
median), so the mean is judged against the other participants' means, not
against an absolute threshold:

- a sender with ``history_min_rounds`` observations whose mean lies more
  than ``history`` robust deviations above the median of the round's means
  is rejected, whatever it scores this round;
- a sender with that many observations whose mean is at or below that
  median is spared the per-round ``sigmas`` rule: its history says it
  usually helps, and one noisy round should not cost its update.

A sender with fewer observations faces the per-round rule alone. The state
is a running sum and count per sender (`state_dict`), so it does not depend
on the order of updates within a round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedbus.aggregation._util import (
    F64,
    check_updates,
    delta_vectors,
    dense_vectors,
    flatten,
    float_param,
    unflatten,
)
from fedbus.aggregation.base import (
    AggregationError,
    Arrays,
    ClientUpdate,
    cast_like,
    sorted_updates,
)
from fedbus.errors import ConfigError

__all__ = ["AccuracyGate"]

_PATH = "protocol.validators"

_Z_CLIP: Final = 3.0
"""Bound on one round's z-score in the history: one wild round must not decide a mean."""
_MEAN_SCALE_FLOOR: Final = 0.1
"""Floor on the spread of the round's history means, in z units (identical means)."""
_HISTORY_PREFIX: Final = "history/"


class AccuracyGate:
    """Reject updates that make the global model worse on the node's validation set.

    Args:
        evaluate: ``weights -> accuracy`` in [0, 1], or an object with an
            ``evaluate(weights)`` method returning a result with ``accuracy``
            and ``loss`` attributes (a fedbus `Trainer` built on the
            validation set). The runtime injects it; it cannot come from YAML.
        mode: ``marginal`` (score ``global + w_k * delta_k``) or ``full``
            (score the client's own model; only sensible on IID data).
        metric: ``loss`` or ``accuracy``; the worsening is the loss increase
            or the accuracy drop. None: ``loss`` in ``marginal`` mode when the
            evaluator reports one, else ``accuracy``.
        sigmas: reject a worsening more than this many robust deviations
            above the round's median (``marginal`` only). None: 1.0, unless
            ``max_drop`` is given, which then is the only rule (a user who
            names an absolute threshold gets exactly that).
        max_drop: reject a worsening larger than this, absolutely; None turns
            it off. ``full`` mode defaults to 0.05 accuracy.
        min_rel_scale: floor on the round's spread, as a fraction of the
            median absolute worsening, so a round of near-identical scores
            does not reject tiny differences.
        min_updates: below this many updates the ``sigmas`` rule is skipped
            (and no history is recorded).
        history: reject a sender whose running mean z-score lies more than
            this many robust deviations above the median of the round's
            means, and spare senders below that median the ``sigmas`` rule
            (``marginal`` only; module docstring). None: per-round rules only.
        history_min_rounds: observations a sender needs before its history
            counts, either way.
    """

    name: Final = "validation_accuracy"

    def __init__(
        self,
        evaluate: Any,
        mode: str = "marginal",
        metric: str | None = None,
        sigmas: float | None = None,
        max_drop: float | None = None,
        min_rel_scale: float = 0.05,
        min_updates: int = 3,
        history: float | None = None,
        history_min_rounds: int = 3,
    ) -> None:
        if callable(evaluate):
            self._evaluate: Callable[[Arrays], Any] = evaluate
        elif callable(getattr(evaluate, "evaluate", None)):
            self._evaluate = evaluate.evaluate
        else:
            raise ConfigError(
                "needs an evaluate(weights) callable or a trainer holding the validation set",
                path=f"{_PATH}.evaluate",
            )
        if mode not in ("marginal", "full"):
            raise ConfigError(f"must be marginal or full, got {mode!r}", path=f"{_PATH}.mode")
        self.mode = mode
        if metric is None and mode == "full":
            metric = "accuracy"
        if metric not in (None, "loss", "accuracy"):
            raise ConfigError(f"must be loss or accuracy, got {metric!r}", path=f"{_PATH}.metric")
        self.metric = metric
        if mode == "full":
            sigmas = None
            max_drop = 0.05 if max_drop is None else max_drop
        elif sigmas is None and max_drop is None:
            sigmas = 1.0
        self.sigmas = (
            None
            if sigmas is None
            else float_param(sigmas, "sigmas", low=0.0, low_open=True, path=_PATH)
        )
        self.max_drop = (
            None if max_drop is None else float_param(max_drop, "max_drop", low=0.0, path=_PATH)
        )
        self.min_rel_scale = float_param(min_rel_scale, "min_rel_scale", low=0.0, path=_PATH)
        self.min_updates = int(float_param(min_updates, "min_updates", low=1, path=_PATH))
        if history is not None and mode != "marginal":
            raise ConfigError("needs mode marginal", path=f"{_PATH}.history")
        self.history = (
            None
            if history is None
            else float_param(history, "history", low=0.0, low_open=True, path=_PATH)
        )
        self.history_min_rounds = int(
            float_param(history_min_rounds, "history_min_rounds", low=1, path=_PATH)
        )
        self._seen: dict[str, tuple[float, int]] = {}
        """Per sender: sum of its clipped round z-scores, and the rounds it was scored in."""
        self.last_history: dict[str, float] = {}
        """Per sender in the last call: its mean's deviation from the round's median mean."""
        self.last_accuracy: dict[str, float] = {}
        """Validation accuracy per sender in the last call (of the model scored), ``""``: global."""
        self.last_worsening: dict[str, float] = {}
        """Per sender in the last call: how much its update worsened the metric (< 0: improved)."""

    def score(self, weights: Arrays) -> tuple[float, float]:
        """``(accuracy, badness)`` of ``weights``: badness is the loss, or minus the accuracy."""
        result = self._evaluate(weights)
        accuracy = float(getattr(result, "accuracy", result))
        loss = getattr(result, "loss", None)
        if self.metric == "accuracy" or (self.metric is None and loss is None):
            return accuracy, -accuracy
        if loss is None:
            raise ConfigError(
                "metric 'loss' needs an evaluator returning a result with .loss",
                path=f"{_PATH}.metric",
            )
        return accuracy, float(loss)

    def accuracy(self, weights: Arrays) -> float:
        """Validation accuracy of ``weights``."""
        return self.score(weights)[0]

    def validate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, str]:
        """Reject each update whose (marginal) effect worsens the validation metric too much."""
        del round
        ordered = sorted_updates(updates)
        if not ordered:
            return {}
        check_updates(ordered, self.name)
        base_acc, base_bad = self.score(global_weights)
        self.last_accuracy = {"": base_acc}
        if self.mode == "full":
            rows = dense_vectors(global_weights, ordered)
        else:
            examples = np.array([max(u.num_examples, 0) for u in ordered], np.float64)
            total = float(examples.sum())
            share = examples / total if total > 0 else np.full(len(ordered), 1.0 / len(ordered))
            start = flatten(global_weights, list(global_weights))
            rows = start + delta_vectors(global_weights, ordered) * share[:, None]
        worse = np.empty(len(ordered), np.float64)
        for i, (u, row) in enumerate(zip(ordered, rows, strict=True)):
            acc, bad = self.score(self._model(row, global_weights))
            self.last_accuracy[u.sender] = acc
            worse[i] = bad - base_bad
        # A model that evaluates to NaN (an overflowing poisoned update) is as bad as it gets,
        # and must not turn the round's median into NaN, which would pass everyone.
        worse = np.where(np.isfinite(worse), worse, np.inf)
        self.last_worsening = {u.sender: float(w) for u, w in zip(ordered, worse, strict=True)}
        reject = ~np.isfinite(worse)
        if self.max_drop is not None:
            reject |= worse > self.max_drop
        finite = worse[np.isfinite(worse)]
        self.last_history = {}
        if finite.size >= self.min_updates:
            centre, scale = self._spread(finite)
            hot = np.zeros(len(ordered), bool)
            if self.sigmas is not None:
                hot = (worse > 0) & (worse > centre + self.sigmas * scale)
            if self.history is not None:
                z = np.where(np.isfinite(worse), (worse - centre) / scale, _Z_CLIP)
                deviation, known = self._record([u.sender for u in ordered], z)
                reject |= known & (deviation > self.history)
                hot &= ~(known & (deviation <= 0))
            reject |= hot
        return {u.sender: self.name for u, r in zip(ordered, reject, strict=True) if r}

    def _spread(self, worse: F64) -> tuple[float, float]:
        """The round's median worsening and its robust scale (floored)."""
        centre = float(np.median(worse))
        scale = 1.4826 * float(np.median(np.abs(worse - centre)))
        floor = self.min_rel_scale * float(np.median(np.abs(worse)))
        return centre, max(scale, floor, 1e-12)

    def _record(self, senders: list[str], z: F64) -> tuple[F64, npt.NDArray[np.bool_]]:
        """Add this round's z-scores to each sender's history.

        Returns:
            Each sender's running mean, as robust deviations from the median
            of the round's means, and whether it has ``history_min_rounds``
            observations.
        """
        clipped = np.clip(z, -_Z_CLIP, _Z_CLIP)
        means = np.empty(len(senders), np.float64)
        counts = np.empty(len(senders), np.int64)
        for i, (sender, value) in enumerate(zip(senders, clipped, strict=True)):
            total, count = self._seen.get(sender, (0.0, 0))
            total, count = total + float(value), count + 1
            self._seen[sender] = (total, count)
            means[i], counts[i] = total / count, count
        centre = float(np.median(means))
        scale = max(1.4826 * float(np.median(np.abs(means - centre))), _MEAN_SCALE_FLOOR)
        deviation = (means - centre) / scale
        self.last_history = {s: float(d) for s, d in zip(senders, deviation, strict=True)}
        return deviation, counts >= self.history_min_rounds

    def state_dict(self) -> dict[str, npt.NDArray[Any]]:
        """The history: ``history/<sender>`` -> ``[sum of z-scores, rounds]`` (float64)."""
        return {
            _HISTORY_PREFIX + sender: np.array([total, count], np.float64)
            for sender, (total, count) in sorted(self._seen.items())
        }

    def load_state_dict(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        """Restore the history saved by `state_dict` (replacing the current one).

        Raises:
            AggregationError: a key or shape that `state_dict` never writes.
        """
        seen: dict[str, tuple[float, int]] = {}
        for key, value in state.items():
            arr = np.asarray(value, np.float64)
            if not key.startswith(_HISTORY_PREFIX) or arr.shape != (2,):
                raise AggregationError(f"{self.name} state: unexpected entry {key!r}")
            seen[key[len(_HISTORY_PREFIX) :]] = (float(arr[0]), int(arr[1]))
        self._seen = seen

    @staticmethod
    def _model(row: F64, like: Arrays) -> dict[str, Any]:
        return {
            name: cast_like(value, np.asarray(like[name]))
            for name, value in unflatten(row, like).items()
        }

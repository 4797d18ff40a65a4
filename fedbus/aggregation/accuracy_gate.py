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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np

from fedbus.aggregation._util import (
    F64,
    check_updates,
    delta_vectors,
    dense_vectors,
    flatten,
    float_param,
    unflatten,
)
from fedbus.aggregation.base import Arrays, ClientUpdate, cast_like, sorted_updates
from fedbus.errors import ConfigError

__all__ = ["AccuracyGate"]

_PATH = "protocol.validators"


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
        min_updates: below this many updates the ``sigmas`` rule is skipped.
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
        if self.sigmas is not None and finite.size >= self.min_updates:
            reject |= (worse > 0) & (worse > self._threshold(finite, self.sigmas))
        return {u.sender: self.name for u, r in zip(ordered, reject, strict=True) if r}

    def _threshold(self, worse: F64, sigmas: float) -> float:
        centre = float(np.median(worse))
        scale = 1.4826 * float(np.median(np.abs(worse - centre)))
        floor = self.min_rel_scale * float(np.median(np.abs(worse)))
        return centre + sigmas * max(scale, floor, 1e-12)

    @staticmethod
    def _model(row: F64, like: Arrays) -> dict[str, Any]:
        return {
            name: cast_like(value, np.asarray(like[name]))
            for name, value in unflatten(row, like).items()
        }

"""Round metrics: sample-weighted means of what clients report.

Training metrics (loss...) are weighted by each update's ``num_examples``.
Federated-evaluation metrics travel in the same ``metrics`` map under an
``eval_`` prefix, with ``eval_num_examples`` giving the size of the client's
evaluation data; they are weighted by that count, since a client's evaluation
set need not match its training set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from fedbus.aggregation import ClientUpdate

__all__ = [
    "EVAL_COUNT_KEY",
    "EVAL_PREFIX",
    "eval_metrics_entry",
    "federated_metrics",
    "training_metrics",
]

EVAL_PREFIX: Final = "eval_"
EVAL_COUNT_KEY: Final = "eval_num_examples"


def _numeric(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def training_metrics(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    """Sample-weighted mean of each non-eval metric, over the updates that report it."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for u in sorted(updates, key=lambda u: u.sender):
        for key, raw in sorted(u.metrics.items()):
            value = _numeric(raw)
            if value is None or key.startswith(EVAL_PREFIX):
                continue
            sums[key] = sums.get(key, 0.0) + u.num_examples * value
            weights[key] = weights.get(key, 0.0) + u.num_examples
    return {k: sums[k] / weights[k] for k in sorted(sums) if weights[k] > 0}


def federated_metrics(reports: Iterable[Mapping[str, object]]) -> dict[str, float]:
    """Mean of the ``eval_*`` metrics weighted by ``eval_num_examples`` (prefix dropped).

    Reports without a positive count are skipped; ``num_examples`` in the
    result is the total evaluated. Empty when nobody reported.
    """
    sums: dict[str, float] = {}
    total = 0.0
    for metrics in reports:
        count = _numeric(metrics.get(EVAL_COUNT_KEY))
        if count is None or count <= 0:
            continue
        total += count
        for key, raw in sorted(metrics.items()):
            value = _numeric(raw)
            if key == EVAL_COUNT_KEY or value is None or not key.startswith(EVAL_PREFIX):
                continue
            name = key[len(EVAL_PREFIX) :]
            sums[name] = sums.get(name, 0.0) + count * value
    if total <= 0:
        return {}
    result = {k: v / total for k, v in sorted(sums.items())}
    result["num_examples"] = total
    return result


def eval_metrics_entry(num_examples: int, metrics: Mapping[str, object]) -> dict[str, float]:
    """How a client packs an evaluation into its update's metrics."""
    packed: dict[str, float] = {EVAL_COUNT_KEY: float(num_examples)}
    for key, raw in metrics.items():
        value = _numeric(raw)
        if value is not None:
            packed[EVAL_PREFIX + key] = value
    return packed

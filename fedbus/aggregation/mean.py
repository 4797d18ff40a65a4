"""Sample-weighted mean (FedAvg), deterministic to the bit.

The arithmetic is fixed so that arrival order cannot change a result: updates
are sorted by sender, each is multiplied by its sample count in float64 and
added to a float64 accumulator in that order, and the sum is divided once by
the total count before casting back to the model dtype. Elementwise numpy
operations have no reduction order of their own (unlike a BLAS gemv, whose
blocking may depend on the thread count), so the result is also the same on
another machine and after a resume.

Speed comes from cache blocking: the accumulator is walked in blocks of
`BLOCK` elements, and every update is folded into the block while it is still
in cache, so each update is read once from memory instead of a float64
temporary being streamed per update (notes/mqtt-measurements.md section 7).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedbus.aggregation.base import (
    DELTA,
    DENSE,
    AggregationError,
    Arrays,
    ClientUpdate,
    cast_like,
    sorted_updates,
)

__all__ = ["BLOCK", "FedAvg", "weighted_sum"]

BLOCK: Final = 16_384
"""Elements per cache block (128 KiB of float64 accumulator plus as much temporary)."""


def weighted_sum(
    arrays: Sequence[npt.NDArray[Any]], coeffs: Sequence[float], *, block: int = BLOCK
) -> npt.NDArray[np.float64]:
    """Return ``sum(c * a for c, a in zip(coeffs, arrays))`` in float64, in the order given.

    Args:
        arrays: same-shaped arrays of any numeric dtype.
        coeffs: one coefficient per array.
        block: cache block size in elements; the result does not depend on it.
    """
    shape = arrays[0].shape
    flat = [np.asarray(a).reshape(-1) for a in arrays]
    scales = [np.float64(c) for c in coeffs]
    size = flat[0].size
    out = np.zeros(size, dtype=np.float64)
    tmp = np.empty(min(block, size), dtype=np.float64)
    for start in range(0, size, block):
        stop = min(start + block, size)
        acc = out[start:stop]
        part = tmp[: stop - start]
        for values, scale in zip(flat, scales, strict=True):
            np.multiply(values[start:stop], scale, out=part)
            acc += part
    return out.reshape(shape)


class FedAvg:
    """Sample-weighted FedAvg (McMahan et al. 2017): sum_k n_k w_k / sum_k n_k.

    Dense and delta updates may be mixed: a delta d_k stands for the weights
    global + d_k, so the result is the weighted mean of the dense updates and
    deltas plus the delta updates' share of the global weights. Stateless.
    """

    name: Final = "fedavg"

    def aggregate(
        self, global_weights: Arrays, updates: Sequence[ClientUpdate], *, round: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Return the weighted mean of ``updates``; see the class docstring.

        Raises:
            AggregationError: no updates, a zero total sample count, an unknown
                encoding, or two updates from one sender.
        """
        del round  # FedAvg does not depend on the round
        ordered = sorted_updates(updates)
        if not ordered:
            raise AggregationError("fedavg needs at least one update")
        total = sum(u.num_examples for u in ordered)
        if total <= 0:
            raise AggregationError("fedavg needs a positive total num_examples")
        for u in ordered:
            if u.encoding not in (DENSE, DELTA):
                raise AggregationError(f"fedavg cannot read encoding {u.encoding!r} of {u.sender}")
        delta_share = sum(u.num_examples for u in ordered if u.encoding == DELTA) / total
        coeffs = [u.num_examples for u in ordered]
        result: dict[str, npt.NDArray[Any]] = {}
        for name, current in global_weights.items():
            arrays = [u.weights[name] for u in ordered]
            mean = weighted_sum(arrays, coeffs)
            mean /= np.float64(total)
            if delta_share:
                mean += np.float64(delta_share) * np.asarray(current, dtype=np.float64)
            result[name] = cast_like(mean, np.asarray(current))
        return result

    def state_dict(self) -> dict[str, npt.NDArray[Any]]:
        """FedAvg keeps no state."""
        return {}

    def load_state_dict(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        """Accept only the empty state FedAvg saves.

        Raises:
            AggregationError: the state is not empty (it belongs to another aggregator).
        """
        if state:
            raise AggregationError(f"fedavg has no state; got keys {sorted(state)}")

"""Views of received messages that the simulated nodes of one process share.

A broadcast is decoded once per process (`fedbus.inbound.SharedDecodes`), so
the 1,000 clients of a simulation receive the very same message object. What
each would otherwise compute from it, 1,000 times a round, is computed once
here; plus the wire's scalar metrics, which every node kind builds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from fedbus.messages import ALL_SELECTED, Tensor, tensors_to_arrays

__all__ = ["is_selected", "scalars", "shared_arrays"]

_selected_sets: dict[int, tuple[list[str], frozenset[str]]] = {}
"""id(list) -> (the list, its set), for the last few shared ``selected`` lists."""


def is_selected(node_id: str, selected: list[str], *, explicit: bool = False) -> bool:
    """``node_id in selected``, in O(1) for the lists every client of this process shares.

    ``["*"]`` selects every node (`fedbus.messages.ALL_SELECTED`) unless
    ``explicit``: only being named confirms a join.

    Why: broadcasts are decoded once per process (`fedbus.inbound.SharedDecodes`),
    so the 1,000 clients of a simulation receive the very same ``selected``
    lists (the model's and the manifest's); scanning them 1,000 times a round
    was quadratic. The set is built once per list object; the cache keeps a
    reference to the list, so its ``id`` cannot be reused while cached.
    """
    if len(selected) < 32:
        return node_id in selected or (not explicit and ALL_SELECTED in selected)
    entry = _selected_sets.get(id(selected))
    if entry is None or entry[0] is not selected:
        if len(_selected_sets) >= 4:
            _selected_sets.pop(next(iter(_selected_sets)))
        entry = (selected, frozenset(selected))
        _selected_sets[id(selected)] = entry
    return node_id in entry[1] or (not explicit and ALL_SELECTED in entry[1])


_array_views: dict[int, tuple[Mapping[str, Tensor], dict[str, npt.NDArray[Any]]]] = {}
"""id(tensor map) -> (the map, its numpy views), for the last few shared broadcasts."""


def shared_arrays(tensors: Mapping[str, Tensor]) -> dict[str, npt.NDArray[Any]]:
    """`tensors_to_arrays` once per shared broadcast; each caller gets its own dict.

    Why: like ``selected`` (`is_selected`), a broadcast decoded once per
    process reaches all its simulated clients as the same object; 1,000
    clients made the same read-only views of it. The views are read-only
    (the payload is immutable), so sharing them is safe; the dict is copied.
    """
    entry = _array_views.get(id(tensors))
    if entry is None or entry[0] is not tensors:
        if len(_array_views) >= 4:
            _array_views.pop(next(iter(_array_views)))
        entry = (tensors, tensors_to_arrays(tensors))
        _array_views[id(tensors)] = entry
    return dict(entry[1])


def scalars(metrics: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """Keep what the wire's metrics map can carry (scalars; numpy numbers as Python ones)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in metrics.items():
        if isinstance(value, bool | int | float | str):
            out[str(key)] = value
        elif hasattr(value, "item"):
            out[str(key)] = value.item()
    return out

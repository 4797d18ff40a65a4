"""Views of received messages that the simulated nodes of one process share.

A broadcast is decoded once per process (`fedbus.inbound.SharedDecodes`), so
the 1,000 clients of a simulation receive the very same message object. What
each would otherwise compute from it, 1,000 times a round, is computed once
here; plus the wire's scalar metrics, which every node kind builds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import numpy.typing as npt

from fedbus.messages import ALL_SELECTED, Tensor, tensors_to_arrays

__all__ = ["is_selected", "scalars", "shared_arrays"]

_K = TypeVar("_K")
_V = TypeVar("_V")


class _PerObject(Generic[_K, _V]):
    """``derive(obj)`` computed once per object, for the last ``size`` objects seen.

    Keyed by identity: the objects are the shared decodes of broadcasts. An
    entry keeps a reference to its object, so its ``id`` cannot be reused
    while cached.
    """

    def __init__(self, derive: Callable[[_K], _V], size: int = 4) -> None:
        self._derive = derive
        self._size = size
        self._entries: dict[int, tuple[_K, _V]] = {}

    def __call__(self, obj: _K) -> _V:
        entry = self._entries.get(id(obj))
        if entry is None or entry[0] is not obj:
            if len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)))
            entry = (obj, self._derive(obj))
            self._entries[id(obj)] = entry
        return entry[1]


_selected_set: _PerObject[list[str], frozenset[str]] = _PerObject(frozenset)
_array_views: _PerObject[Mapping[str, Tensor], dict[str, npt.NDArray[Any]]] = _PerObject(
    tensors_to_arrays
)


def is_selected(node_id: str, selected: list[str], *, explicit: bool = False) -> bool:
    """``node_id in selected``, in O(1) for the lists every client of this process shares.

    ``["*"]`` selects every node (`fedbus.messages.ALL_SELECTED`) unless
    ``explicit``: only being named confirms a join.

    Why: broadcasts are decoded once per process (`fedbus.inbound.SharedDecodes`),
    so the 1,000 clients of a simulation receive the very same ``selected``
    lists (the model's and the manifest's); scanning them 1,000 times a round
    was quadratic. The set is built once per list object.
    """
    if len(selected) < 32:
        return node_id in selected or (not explicit and ALL_SELECTED in selected)
    members = _selected_set(selected)
    return node_id in members or (not explicit and ALL_SELECTED in members)


def shared_arrays(tensors: Mapping[str, Tensor]) -> dict[str, npt.NDArray[Any]]:
    """`tensors_to_arrays` once per shared broadcast; each caller gets its own dict.

    Why: like ``selected`` (`is_selected`), a broadcast decoded once per
    process reaches all its simulated clients as the same object; 1,000
    clients made the same read-only views of it. The views are read-only
    (the payload is immutable), so sharing them is safe; the dict is copied.
    """
    return dict(_array_views(tensors))


def scalars(metrics: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """Keep what the wire's metrics map can carry (scalars; numpy numbers as Python ones)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in metrics.items():
        if isinstance(value, bool | int | float | str):
            out[str(key)] = value
        elif hasattr(value, "item"):
            out[str(key)] = value.item()
    return out

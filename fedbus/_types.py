"""Small shared types. Standard library only, so every layer may import it."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, NewType

__all__ = ["MessageId", "NodeId", "RoundNum", "RunId", "StateEnum", "Weights"]

NodeId = NewType("NodeId", str)
"""A node's id: one whole MQTT topic level, equal to its MQTT client id."""

RunId = NewType("RunId", str)
"""Identifies one federation run; messages of other runs are dropped."""

RoundNum = NewType("RoundNum", int)
"""1-based round number (0 before the first round)."""

MessageId = NewType("MessageId", str)
"""Unique per message; receivers drop duplicates by it."""

Weights = Mapping[str, Any]
"""Named tensors, in model order: name -> numpy array (or anything with ``__array__``)."""


class StateEnum(enum.Enum):
    """An `enum.Enum` hashed by identity, for states looked up on every event.

    Why: `enum.Enum.__hash__` is Python code (it hashes the member's name);
    members are singletons compared by identity, so the C-level identity
    hash is equivalent, and a machine's transition-table lookups run several
    times per message (about ten per simulated client and round in issue 3).
    """

    __hash__ = object.__hash__

"""Small shared types. Standard library only, so every layer may import it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NewType

__all__ = ["MessageId", "NodeId", "RoundNum", "RunId", "Weights"]

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

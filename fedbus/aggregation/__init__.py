"""Aggregators and update validators: pure functions over named numpy arrays.

See `fedbus.aggregation.base` for the interface later aggregators implement.
"""

from __future__ import annotations

from fedbus.aggregation.base import (
    DELTA,
    DENSE,
    AggregationError,
    Aggregator,
    Arrays,
    ClientUpdate,
    Validator,
    cast_like,
    sorted_updates,
)
from fedbus.aggregation.mean import FedAvg, weighted_sum
from fedbus.aggregation.registry import AGGREGATORS, make_aggregator, register_aggregator

__all__ = [
    "AGGREGATORS",
    "DELTA",
    "DENSE",
    "AggregationError",
    "Aggregator",
    "Arrays",
    "ClientUpdate",
    "FedAvg",
    "Validator",
    "cast_like",
    "make_aggregator",
    "register_aggregator",
    "sorted_updates",
    "weighted_sum",
]

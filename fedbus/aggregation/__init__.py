"""Aggregators and update validators: pure functions over named numpy arrays.

See `fedbus.aggregation.base` for the interface every aggregator implements,
`fedbus.aggregation.registry` for the names ``protocol.aggregator`` accepts and
`fedbus.aggregation.validators` for ``protocol.validators``.
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
    broadcast_extras,
    cast_like,
    sorted_updates,
)
from fedbus.aggregation.clipping import NormClipping
from fedbus.aggregation.fednova import FedNova, QFedAvg
from fedbus.aggregation.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedbus.aggregation.krum import Bulyan, Krum, MultiKrum
from fedbus.aggregation.mean import FedAvg, weighted_sum
from fedbus.aggregation.mifa import Mifa
from fedbus.aggregation.registry import AGGREGATORS, make_aggregator, register_aggregator
from fedbus.aggregation.robust import CoordinateMedian, GeometricMedian, TrimmedMean
from fedbus.aggregation.scaffold import Scaffold
from fedbus.aggregation.validators import (
    VALIDATORS,
    AccuracyGate,
    CosineOutlier,
    NormOutlier,
    ValidatorChain,
    make_validator,
    make_validators,
)

__all__ = [
    "AGGREGATORS",
    "DELTA",
    "DENSE",
    "VALIDATORS",
    "AccuracyGate",
    "AggregationError",
    "Aggregator",
    "Arrays",
    "Bulyan",
    "ClientUpdate",
    "CoordinateMedian",
    "CosineOutlier",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedNova",
    "FedYogi",
    "GeometricMedian",
    "Krum",
    "Mifa",
    "MultiKrum",
    "NormClipping",
    "NormOutlier",
    "QFedAvg",
    "Scaffold",
    "TrimmedMean",
    "Validator",
    "ValidatorChain",
    "broadcast_extras",
    "cast_like",
    "make_aggregator",
    "make_validator",
    "make_validators",
    "register_aggregator",
    "sorted_updates",
    "weighted_sum",
]

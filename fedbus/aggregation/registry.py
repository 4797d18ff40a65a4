"""Build aggregators from the topology's ``protocol.aggregator`` value.

Three spellings are accepted, as in DESIGN.md section 4:

- a name: ``fedavg``;
- a mapping with ``kind`` and parameters, inline or under ``params``:
  ``{kind: trimmed_mean, beta: 0.1}``;
- a mapping with ``factory: "pkg.mod:fn"`` and optional parameters, for
  user-defined aggregators; ``fn(**params)`` must return an `Aggregator`.

Every mistake raises `ConfigError` with the path ``protocol.aggregator`` so the
YAML layer can point at the line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from fedbus.aggregation.base import Aggregator
from fedbus.aggregation.clipping import NormClipping
from fedbus.aggregation.fednova import FedNova, QFedAvg
from fedbus.aggregation.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedbus.aggregation.krum import Bulyan, Krum, MultiKrum
from fedbus.aggregation.mean import FedAvg
from fedbus.aggregation.mifa import Mifa
from fedbus.aggregation.robust import CoordinateMedian, GeometricMedian, TrimmedMean
from fedbus.aggregation.scaffold import Scaffold
from fedbus.errors import ConfigError

__all__ = ["AGGREGATORS", "make_aggregator", "register_aggregator"]

_PATH = "protocol.aggregator"


def _with_inner(cls: Callable[..., Aggregator]) -> Callable[..., Aggregator]:
    """Wrap a constructor whose ``inner`` parameter may be given as a spec (a name, a mapping)."""

    def build(*, inner: Any = None, **params: Any) -> Aggregator:
        if inner is not None:
            try:
                inner = make_aggregator(inner)
            except ConfigError as exc:
                raise ConfigError(exc.message, path=f"{_PATH}.inner") from exc
        return cls(inner=inner, **params)

    build.__doc__ = cls.__doc__
    return build


AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    "bulyan": Bulyan,
    "fedadagrad": _with_inner(FedAdagrad),
    "fedadam": _with_inner(FedAdam),
    "fedavg": FedAvg,
    "fedavgm": _with_inner(FedAvgM),
    "fednova": FedNova,
    "fedyogi": _with_inner(FedYogi),
    "geometric_median": GeometricMedian,
    "krum": Krum,
    "median": CoordinateMedian,
    "mifa": Mifa,
    "multi_krum": MultiKrum,
    "norm_clipping": _with_inner(NormClipping),
    "qfedavg": QFedAvg,
    "scaffold": Scaffold,
    "trimmed_mean": TrimmedMean,
}
"""Name -> constructor taking the spec's parameters as keyword arguments.

``rfa`` is an alias of ``geometric_median``; ``inner`` of the server optimizers
and of ``norm_clipping`` takes any aggregator spec.
"""
AGGREGATORS["rfa"] = GeometricMedian

F = TypeVar("F", bound=Callable[..., Aggregator])


def register_aggregator(name: str) -> Callable[[F], F]:
    """Register an aggregator constructor under ``name`` (decorator).

    Raises:
        ConfigError: the name is taken.
    """

    def decorate(factory: F) -> F:
        if name in AGGREGATORS:
            raise ConfigError(f"aggregator {name!r} is already registered", path=_PATH)
        AGGREGATORS[name] = factory
        return factory

    return decorate


def make_aggregator(spec: str | Mapping[str, Any] | Aggregator) -> Aggregator:
    """Return the aggregator ``spec`` describes (an `Aggregator` passes through).

    Raises:
        ConfigError: unknown name, bad factory, bad parameters, or a result that
            is not an aggregator.
    """
    if isinstance(spec, Aggregator):
        return spec
    if isinstance(spec, str):
        return _build(_lookup(spec), {}, spec)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"expected a name or a mapping, got {type(spec).__name__}", path=_PATH)
    params = dict(spec)
    kind = params.pop("kind", None)
    factory = params.pop("factory", None)
    nested = params.pop("params", None)
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise ConfigError("params must be a mapping", path=f"{_PATH}.params")
        clash = sorted(set(nested) & set(params))
        if clash:
            raise ConfigError(f"parameters given twice: {clash}", path=f"{_PATH}.params")
        params.update(nested)
    if (kind is None) == (factory is None):
        raise ConfigError("give exactly one of kind or factory", path=_PATH)
    if kind is not None:
        if not isinstance(kind, str):
            raise ConfigError("kind must be a string", path=f"{_PATH}.kind")
        return _build(_lookup(kind), params, kind)
    return _build(_import_factory(factory), params, str(factory))


def _lookup(name: str) -> Callable[..., Aggregator]:
    try:
        return AGGREGATORS[name]
    except KeyError:
        known = ", ".join(sorted(AGGREGATORS))
        raise ConfigError(f"unknown aggregator {name!r}; known: {known}", path=_PATH) from None


def _import_factory(ref: Any) -> Callable[..., Aggregator]:
    path = f"{_PATH}.factory"
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ConfigError(f"factory must look like 'pkg.mod:fn', got {ref!r}", path=path)
    module_name, attr = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}", path=path) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{ref!r} is not a callable in {module_name}", path=path)
    return factory  # type: ignore[no-any-return]


def _build(factory: Callable[..., Aggregator], params: dict[str, Any], what: str) -> Aggregator:
    try:
        built = factory(**params)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot build aggregator {what!r}: {exc}", path=_PATH) from exc
    if not isinstance(built, Aggregator):
        raise ConfigError(
            f"{what!r} returned {type(built).__name__}, which is not an Aggregator "
            "(needs aggregate, state_dict and load_state_dict)",
            path=_PATH,
        )
    return built

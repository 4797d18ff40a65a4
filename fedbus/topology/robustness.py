"""``protocol.validators`` and ``attacks``: update screening and simulated attackers.

Both are checked against their registries (`fedbus.aggregation.validators`,
`fedbus.attacks.registry`) when the file is read, so a typo'd kind or
parameter is a ``fedbus validate`` problem with its line, not a failure in
round 1. The registries are imported lazily: ``import fedbus.topology`` stays
light for commands that never see these keys.

Attackers are drawn here too (`assign_attackers`), because the topology check
needs their number (a fraction that selects nobody is almost certainly a
mistake) and the runtime needs the very same draw.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from fedbus.errors import ConfigError
from fedbus.topology.problems import Checked
from fedbus.topology.reader import Context, Section, plain_data, type_name
from fedbus.topology.yamlpos import Located

if TYPE_CHECKING:
    from fedbus.attacks.registry import Attack

__all__ = [
    "DEFAULT_ROBUST_VALIDATORS",
    "DEFAULT_VALIDATION_FRACTION",
    "AttackSpec",
    "ValidatorSpec",
    "assign_attackers",
    "read_attacks",
    "read_validators",
]

DEFAULT_VALIDATION_FRACTION: Final = 0.1
"""Share of the held-out split that ``validation_accuracy`` keeps for itself."""

_ACCURACY: Final = "validation_accuracy"

DEFAULT_ROBUST_VALIDATORS: Final[tuple[Mapping[str, Any], ...]] = (
    MappingProxyType({"kind": "norm_outlier"}),
    MappingProxyType({"kind": "cosine_outlier", "reference": "median"}),
    MappingProxyType({"kind": _ACCURACY, "validation_fraction": 0.5, "history": 1.5}),
)
"""The ``protocol.validators`` that docs/robustness.md measures as the default robust
configuration (with ``aggregator: fedavg``). The statistics checks stop model
poisoning; the validation gate recovers most of what label flipping costs
(flippers look honest to update statistics), and needs a validation set of
half the held-out split to see it: with 10%, a flipped class may have one or
two validation examples. ``history`` lets the gate judge each client on its
running mean score over the rounds, not on one noisy round. Not applied
unless a topology asks for it.
"""


def _rerooted(exc: ConfigError, prefix: str) -> str:
    """``exc.path`` relative to ``prefix`` (the registries name absolute paths)."""
    path = exc.path or ""
    if path == prefix:
        return ""
    if path.startswith(prefix + "."):
        return path[len(prefix) + 1 :]
    return path if not path.startswith(prefix) else path[len(prefix) :]


def _validator_params(kind: str) -> tuple[str, ...]:
    """The keyword parameters of validator ``kind`` (``evaluate`` is injected, not read)."""
    from fedbus.aggregation.validators import VALIDATORS

    sig = inspect.signature(VALIDATORS[kind])
    return tuple(name for name in sig.parameters if name != "evaluate")


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidatorSpec(Checked):
    """One ``protocol.validators`` entry.

    Attributes:
        kind: ``norm_outlier``, ``cosine_outlier`` or ``validation_accuracy``.
        params: the validator's keyword parameters.
        validation_fraction: for ``validation_accuracy``, the share of the
            held-out split moved to the aggregating node's validation set
            (the test split shrinks by as much, so the two stay disjoint).
    """

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    validation_fraction: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        Checked.__post_init__(self)

    def _problems(self) -> Iterator[tuple[str, str]]:
        from fedbus.aggregation.validators import VALIDATORS, make_validator

        if self.kind not in VALIDATORS:
            yield "kind", f"unknown validator {self.kind!r}; known: {', '.join(sorted(VALIDATORS))}"
            return
        if self.validation_fraction is not None:
            if self.kind != _ACCURACY:
                yield "validation_fraction", f"applies only to kind {_ACCURACY!r}"
            elif not 0.0 < self.validation_fraction < 1.0:
                yield "validation_fraction", f"must be in (0, 1), got {self.validation_fraction}"
        params: dict[str, Any] = dict(self.params)
        if self.kind == _ACCURACY:
            params["evaluate"] = _no_evaluation  # the runtime injects the real one
        try:
            make_validator({"kind": self.kind, **params})
        except ConfigError as exc:
            yield _rerooted(exc, "protocol.validators[0]"), exc.message

    @property
    def fraction(self) -> float:
        """The effective validation fraction (``validation_accuracy`` only; else 0)."""
        if self.kind != _ACCURACY:
            return 0.0
        if self.validation_fraction is None:
            return DEFAULT_VALIDATION_FRACTION
        return self.validation_fraction

    def as_dict(self) -> dict[str, Any]:
        """``{kind, **params}`` as `fedbus.aggregation.make_validator` takes it."""
        return {"kind": self.kind, **self.params}


def _no_evaluation(weights: object) -> float:
    """Stands in for the runtime's evaluator while parameters are checked."""
    del weights
    return 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AttackSpec(Checked):
    """One ``attacks`` entry (simulation only).

    Attributes:
        kind: an attack of `fedbus.attacks.ATTACKS`.
        fraction: share of the started data-holding nodes that attack, drawn
            from the seed; None with ``nodes`` (or 0.2 when neither is given).
        params: overrides of the attack's defaults.
        nodes: explicit attackers instead of a fraction.
        rounds: the rounds it is active in (1-based); empty: see ``every``.
        every: active in rounds divisible by this (the attack's ``period``);
            None keeps the attack's own default period.
    """

    kind: str
    fraction: float | None = None
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    nodes: tuple[str, ...] = ()
    rounds: tuple[int, ...] = ()
    every: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        Checked.__post_init__(self)

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.fraction is not None and self.nodes:
            yield "fraction", "give fraction or nodes, not both"
        if self.rounds and self.every is not None:
            yield "every", "give rounds or every, not both"
        if self.every is not None:
            if self.every < 1:
                yield "every", f"must be at least 1, got {self.every}"
            if "period" in self.params:
                yield "every", "give every or params.period, not both"
        for i, r in enumerate(self.rounds):
            if r < 1:
                yield f"rounds[{i}]", f"must be at least 1, got {r}"
        if len(set(self.nodes)) != len(self.nodes):
            yield "nodes", "names a node twice"
        try:
            self.attack()
        except ConfigError as exc:
            yield _rerooted(exc, "attacks[0]"), exc.message

    def attack(self) -> Attack:
        """The `fedbus.attacks.Attack` with effective parameters.

        Raises:
            ConfigError: unknown kind or parameter, bad fraction or period.
        """
        from fedbus.attacks.registry import make_attack

        params = dict(self.params)
        if self.every is not None and self.every >= 1:
            params["period"] = self.every
        fraction = self.fraction if self.fraction is not None else (0.0 if self.nodes else 0.2)
        return make_attack({"kind": self.kind, "fraction": fraction, "params": params})

    def active(self, round_num: int) -> bool:
        """Whether the attack runs in ``round_num``: listed rounds, else its period."""
        if self.rounds:
            return round_num in self.rounds
        return bool(self.attack().active(round_num))


def assign_attackers(
    specs: Sequence[AttackSpec], pool: Sequence[str], seed: int
) -> list[tuple[str, ...]]:
    """The attackers of each spec: its ``nodes``, or ``round(fraction * len(pool))`` drawn nodes.

    Explicit nodes are taken first; the draws then come from what is left, in
    file order, so no node attacks twice. The first drawn attack uses the
    same draw as `fedbus.attacks.Attack.attackers` (and so the one-process
    loop of `fedbus.attacks.simulate`) for the same seed and nodes.
    """
    taken = {name for spec in specs for name in spec.nodes}
    remaining = sorted(set(pool) - taken)
    out: list[tuple[str, ...]] = []
    for i, spec in enumerate(specs):
        if spec.nodes:
            out.append(tuple(sorted(spec.nodes)))
            continue
        fraction = spec.fraction if spec.fraction is not None else 0.2
        k = min(round(fraction * len(pool)), len(remaining))
        key: list[int] = [seed, zlib.crc32(b"attackers")] + ([i] if out else [])
        order = np.random.default_rng(key).permutation(len(remaining))
        chosen = sorted(remaining[j] for j in order[:k])
        out.append(tuple(chosen))
        remaining = [name for name in remaining if name not in set(chosen)]
    return out


# -- reading ---------------------------------------------------------------------------


def read_validators(ctx: Context, node: Located | None, path: str) -> tuple[ValidatorSpec, ...]:
    """``[{kind: ..., <params>}, ...]``; a bare name stands for ``{kind: name}``."""
    from fedbus.aggregation.validators import VALIDATORS

    if node is None or node.value is None:
        return ()
    if not node.is_sequence:
        ctx.add(path, f"must be a list of {{kind: ...}}, got {type_name(node.value)}")
        return ()
    out: list[ValidatorSpec] = []
    for i, item in enumerate(node.value):
        where = f"{path}[{i}]"
        kind: Any
        mapping = item.is_mapping
        if isinstance(item.value, str):
            kind = item.value
        elif mapping:
            raw = item.value.get("kind")
            kind = raw.value if raw is not None else None
        else:
            ctx.add(where, f"must be a name or {{kind: ...}}, got {type_name(item.value)}")
            continue
        if kind not in VALIDATORS:
            shown = "missing" if kind is None else repr(kind)
            ctx.add(f"{where}.kind", f"{shown}; must be one of {', '.join(sorted(VALIDATORS))}")
            continue
        names = _validator_params(kind)
        params: dict[str, Any] = {}
        fraction = None
        if mapping:
            extra = ("validation_fraction",) if kind == _ACCURACY else ()
            sec = Section(ctx, item, where, ("kind", "params", *extra, *names))
            fraction = sec.opt_number("validation_fraction")
            params = {k: plain_data(v) for k, v in sec.items.items() if k in names}
            nested = sec.node("params")
            if nested is not None:
                inner = Section(ctx, nested, sec.at("params"), names)
                for key, value in inner.items.items():
                    if key in params:
                        ctx.add(inner.at(key), "given twice (inline and under params)")
                    params[key] = plain_data(value)
        out.append(
            ctx.build(where, ValidatorSpec, kind=kind, params=params, validation_fraction=fraction)
        )
    return tuple(out)


_ATTACK_KEYS: Final = ("kind", "fraction", "params", "nodes", "rounds", "every")


def read_attacks(ctx: Context, node: Located | None) -> tuple[AttackSpec, ...]:
    """``attacks: [{kind, fraction | nodes, params, rounds | every}]``."""
    from fedbus.attacks.registry import ATTACKS

    if node is None or node.value is None:
        return ()
    if not node.is_sequence:
        ctx.add("attacks", f"must be a list of {{kind: ...}}, got {type_name(node.value)}")
        return ()
    out: list[AttackSpec] = []
    for i, item in enumerate(node.value):
        where = f"attacks[{i}]"
        raw = item.value.get("kind") if item.is_mapping else None
        kind = raw.value if raw is not None else None
        if kind not in ATTACKS:
            if not item.is_mapping:
                ctx.add(where, f"must be a mapping {{kind: ...}}, got {type_name(item.value)}")
            else:
                shown = "missing" if kind is None else f"unknown attack {kind!r}"
                ctx.add(f"{where}.kind", f"{shown}; known: {', '.join(sorted(ATTACKS))}")
            continue
        sec = Section(ctx, item, where, _ATTACK_KEYS)
        params_sec = Section(ctx, sec.node("params"), sec.at("params"), tuple(ATTACKS[kind]))
        rounds = _int_list(ctx, sec, "rounds")
        spec = ctx.build(
            where,
            AttackSpec,
            kind=kind,
            fraction=sec.opt_number("fraction"),
            params={k: plain_data(v) for k, v in params_sec.items.items()},
            nodes=sec.str_list("nodes"),
            rounds=rounds,
            every=sec.opt_integer("every"),
        )
        out.append(spec)
    return tuple(out)


def _int_list(ctx: Context, sec: Section, key: str) -> tuple[int, ...]:
    node = sec.node(key)
    if node is None or node.value is None:
        return ()
    items = node.value if node.is_sequence else [node]
    values: list[int] = []
    for j, item in enumerate(items):
        value = item.value
        if isinstance(value, int) and not isinstance(value, bool):
            values.append(value)
        else:
            ctx.add(f"{sec.at(key)}[{j}]", f"must be an integer, got {type_name(value)}")
    return tuple(values)

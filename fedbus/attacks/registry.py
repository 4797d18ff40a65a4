"""``attacks: [{kind, fraction, params}]``: build attacks and print what they do.

`make_attack` turns a spec into an `Attack` holding the *effective*
parameters (defaults filled in), and `Attack.describe` prints them; a result
reported without them cannot be compared with anyone else's (Blades #78: two
"sign flip" attacks, two different outcomes).

Kinds and defaults (override any under ``params``):

==================  =========================================================
label_flip          data: y -> C-1-y
backdoor            data: target 0, poison_fraction 0.5, trigger size 2, value 1.0,
                    epochs None (local epochs on poisoned data; None = as honest)
sign_flip           model: scale -4.0
gaussian            model: mean 0.0, std 1.0
scaling             model: scale n/eta (None), eta 1.0
model_replacement   backdoor data + scaling, period 10 (active in 10% of rounds)
alie                model: z from Baruch et al.'s formula (None)
ipm                 model: epsilon 0.1
free_rider          model: noise_std 0.0
==================  =========================================================

Every kind also takes ``period`` (active in rounds divisible by it; 1 = every
round). Outside its active rounds an attacker behaves honestly.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.attacks import data as data_attacks
from fedbus.attacks import model as model_attacks
from fedbus.errors import ConfigError
from fedbus.learning.data import Dataset

__all__ = ["ATTACKS", "Attack", "AttackContext", "make_attack", "make_attacks"]

_BACKDOOR = {"target": 0, "poison_fraction": 0.5, "size": 2, "value": 1.0, "epochs": None}

ATTACKS: dict[str, dict[str, Any]] = {
    "label_flip": {"period": 1},
    "backdoor": {**_BACKDOOR, "period": 1},
    "sign_flip": {"scale": -4.0, "period": 1},
    "gaussian": {"mean": 0.0, "std": 1.0, "period": 1},
    "scaling": {"scale": None, "eta": 1.0, "period": 1},
    "model_replacement": {**_BACKDOOR, "scale": None, "eta": 1.0, "period": 10},
    "alie": {"z": None, "period": 1},
    "ipm": {"epsilon": 0.1, "period": 1},
    "free_rider": {"noise_std": 0.0, "period": 1},
}
"""Kind -> default parameters."""

_DATA_KINDS = frozenset({"label_flip", "backdoor", "model_replacement"})
_MODEL_KINDS = frozenset(ATTACKS) - {"label_flip", "backdoor"}


@dataclass(frozen=True, slots=True, kw_only=True)
class AttackContext:
    """What a model-poisoning attacker knows in one round.

    Attributes:
        honest: the update it would have sent (dense weights).
        global_weights: the model the round started from.
        peers: the honest updates of the round (omniscient attacks).
        num_clients: updates the server averages this round (n).
        num_attackers: attackers this round (f).
        own_examples: the num_examples the attacker reports.
        total_examples: the round's total num_examples; with ``own_examples``
            it makes model replacement exact under sample-weighted FedAvg.
        rng: this attacker's randomness for this round.
    """

    honest: Mapping[str, npt.NDArray[Any]]
    global_weights: Mapping[str, npt.NDArray[Any]]
    peers: Sequence[Mapping[str, npt.NDArray[Any]]] = ()
    num_clients: int = 1
    num_attackers: int = 0
    own_examples: int | None = None
    total_examples: int | None = None
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))


@dataclass(frozen=True, slots=True)
class Attack:
    """One configured attack: kind, fraction of clients, effective parameters."""

    kind: str
    fraction: float
    params: Mapping[str, Any]

    @property
    def poisons_data(self) -> bool:
        """Whether attackers train on altered data."""
        return self.kind in _DATA_KINDS

    @property
    def poisons_model(self) -> bool:
        """Whether attackers replace their update."""
        return self.kind in _MODEL_KINDS

    def describe(self) -> str:
        """``kind(fraction=..., param=value, ...)``, with every effective parameter."""
        shown = {k: ("n/eta" if k == "scale" and v is None else v) for k, v in self.params.items()}
        if self.kind == "alie" and shown.get("z") is None:
            shown["z"] = "z_max(n, f)"
        body = ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))
        return f"{self.kind}(fraction={self.fraction}, {body})"

    def attackers(self, client_ids: Sequence[str], seed: int) -> list[str]:
        """The ``round(fraction * n)`` attacking clients, drawn with ``seed``, sorted."""
        ids = sorted(client_ids)
        k = round(self.fraction * len(ids))
        rng = np.random.default_rng([seed, zlib.crc32(b"attackers")])
        return sorted(ids[i] for i in rng.permutation(len(ids))[:k])

    def active(self, round_num: int) -> bool:
        """Whether attackers attack in ``round_num`` (1-based)."""
        return round_num % int(self.params["period"]) == 0

    def poison_data(self, dataset: Dataset, *, rng: np.random.Generator) -> Dataset:
        """The attacker's training data (unchanged for pure model attacks)."""
        p = self.params
        if self.kind == "label_flip":
            return data_attacks.flip_labels(dataset)
        if self.kind in ("backdoor", "model_replacement"):
            return data_attacks.poison_backdoor(
                dataset,
                target=int(p["target"]),
                poison_fraction=float(p["poison_fraction"]),
                size=int(p["size"]),
                value=float(p["value"]),
                rng=rng,
            )
        return dataset

    def poison_update(self, ctx: AttackContext) -> dict[str, npt.NDArray[Any]]:
        """What the attacker sends instead of ``ctx.honest`` (dense weights)."""
        p, g = self.params, ctx.global_weights
        if self.kind == "sign_flip":
            return model_attacks.sign_flip(ctx.honest, g, scale=float(p["scale"]))
        if self.kind == "gaussian":
            return model_attacks.gaussian(g, rng=ctx.rng, mean=p["mean"], std=p["std"])
        if self.kind in ("scaling", "model_replacement"):
            return model_attacks.scale_update(ctx.honest, g, scale=self.scale(ctx))
        if self.kind == "alie":
            z = (
                p["z"]
                if p["z"] is not None
                else model_attacks.alie_z(ctx.num_clients, ctx.num_attackers)
            )
            return model_attacks.alie(ctx.peers, g, z=float(z))
        if self.kind == "ipm":
            return model_attacks.ipm(ctx.peers, g, epsilon=float(p["epsilon"]))
        if self.kind == "free_rider":
            return model_attacks.free_rider(g, rng=ctx.rng, noise_std=float(p["noise_std"]))
        return {k: np.asarray(v) for k, v in ctx.honest.items()}

    def scale(self, ctx: AttackContext) -> float:
        """Model replacement's gamma: the given scale, else n/eta (sum n_j / n_k under weighting)."""
        if self.params.get("scale") is not None:
            return float(self.params["scale"])
        n = float(ctx.num_clients)
        if ctx.own_examples and ctx.total_examples:
            n = ctx.total_examples / ctx.own_examples
        return n / float(self.params["eta"])


def make_attack(spec: str | Mapping[str, Any], *, index: int = 0) -> Attack:
    """Build an `Attack` from ``kind`` or ``{kind, fraction (default 0.2), params}``.

    Raises:
        ConfigError: unknown kind or parameter, a fraction outside [0, 1], a
            period below 1; names ``attacks[index]``.
    """
    path = f"attacks[{index}]"
    raw: dict[str, Any] = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = raw.pop("kind", None)
    if kind not in ATTACKS:
        raise ConfigError(
            f"unknown attack {kind!r}; known: {', '.join(sorted(ATTACKS))}", path=f"{path}.kind"
        )
    fraction = raw.pop("fraction", 0.2)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not 0 <= fraction <= 1
    ):
        raise ConfigError(f"must be a number in [0, 1], got {fraction!r}", path=f"{path}.fraction")
    params = raw.pop("params", None) or {}
    if raw:
        raise ConfigError(f"unknown keys {sorted(raw)}; put parameters under params", path=path)
    unknown = sorted(set(params) - set(ATTACKS[kind]))
    if unknown:
        raise ConfigError(
            f"{kind} has no parameters {unknown}; known: {sorted(ATTACKS[kind])}",
            path=f"{path}.params",
        )
    effective = {**ATTACKS[kind], **params}
    if (
        isinstance(effective["period"], bool)
        or not isinstance(effective["period"], int)
        or effective["period"] < 1
    ):
        raise ConfigError("must be an integer >= 1", path=f"{path}.params.period")
    return Attack(kind, float(fraction), effective)


def make_attacks(specs: Sequence[str | Mapping[str, Any]]) -> list[Attack]:
    """Build the ``attacks`` list."""
    return [make_attack(spec, index=i) for i, spec in enumerate(specs)]

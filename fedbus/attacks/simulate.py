"""A one-process federated loop with attackers, for tests and the attack matrix.

The same recipe as ``benchmarks/reference_fedavg.py`` (client i holds
partition part i, ``fit_seed`` per client and round, the global model
evaluated on the held-out test split after each round), with three hooks:
attacking clients train on poisoned data and/or replace their update, the
round's updates pass through validators, and any `Aggregator` combines them.
No bus, no nodes: the point is to measure attacks and defenses, quickly.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedbus.aggregation.base import Aggregator, ClientUpdate, Validator
from fedbus.attacks.data import backdoor_test_set
from fedbus.attacks.registry import Attack, AttackContext
from fedbus.learning.data import Dataset
from fedbus.learning.partition import FederationData, build_federation_data
from fedbus.learning.seeds import derive_seed, fit_seed, init_seed
from fedbus.learning.trainer import FitConfig, NamedArrays, Trainer
from fedbus.learning.trainers import make_trainer

__all__ = ["SimConfig", "SimResult", "simulate"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """The federation: digits, Dirichlet partition, an MLP, all clients every round."""

    num_clients: int = 20
    rounds: int = 30
    alpha: float = 0.5
    hidden: tuple[int, ...] = (32,)
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    seed: int = 0
    validation_fraction: float = 0.0
    """Share of the test split moved to a validation set (for `AccuracyGate`); 0 keeps all."""


@dataclass(slots=True)
class SimResult:
    """Per-round history and the end-of-run numbers."""

    accuracy: list[float] = field(default_factory=list)
    backdoor_success: list[float] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    attackers: list[str] = field(default_factory=list)
    weights: NamedArrays = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float:
        """Test accuracy of the last global model."""
        return self.accuracy[-1]


@functools.cache
def _data(cfg: SimConfig) -> tuple[FederationData, Dataset, Dataset | None]:
    ids = [f"client-{i}" for i in range(cfg.num_clients)]
    data = build_federation_data(
        "digits", {}, "dirichlet", {"alpha": cfg.alpha}, ids, test_fraction=0.2, seed=cfg.seed
    )
    test, val = data.test, None
    if cfg.validation_fraction > 0:
        order = np.random.default_rng(derive_seed(cfg.seed, "validation")).permutation(len(test))
        cut = round(cfg.validation_fraction * len(test))
        val, test = test.subset(np.sort(order[:cut])), test.subset(np.sort(order[cut:]))
    return data, test, val


def _trainer(cfg: SimConfig, train: Dataset | None, ev: Dataset | None) -> Trainer:
    return make_trainer(
        {"kind": "mlp", "hidden": list(cfg.hidden)},
        train,
        ev,
        num_features=64,
        num_classes=10,
        seed=cfg.seed,
    )


def simulate(
    aggregator: Aggregator,
    attack: Attack | None = None,
    cfg: SimConfig = SimConfig(),
    *,
    validators: Callable[[Trainer | None], Sequence[Validator]] | None = None,
) -> SimResult:
    """Run ``cfg.rounds`` rounds of federated training under ``attack``.

    Args:
        aggregator: combines each round's (validated) updates.
        attack: None for a clean run.
        cfg: the federation.
        validators: builds the round's validators, given a trainer that
            evaluates on the validation split (None when
            ``cfg.validation_fraction`` is 0).

    Returns:
        Test accuracy per round, backdoor success per round (backdoor kinds
        only), rejections per round, the attackers and the final weights.
    """
    # A poisoned model may overflow float32 (that is the attack working), so
    # numpy's overflow warnings are silenced for the run.
    with np.errstate(all="ignore"):
        return _simulate(aggregator, attack, cfg, validators)


def _simulate(
    aggregator: Aggregator,
    attack: Attack | None,
    cfg: SimConfig,
    validators: Callable[[Trainer | None], Sequence[Validator]] | None,
) -> SimResult:
    data, test, val = _data(cfg)
    ids = sorted(data.train)
    attackers = attack.attackers(ids, cfg.seed) if attack is not None else []
    trainers = {cid: _trainer(cfg, data.train[cid], None) for cid in ids}
    poisoned: dict[str, Trainer] = {}
    if attack is not None and attack.poisons_data:
        for cid in attackers:
            rng = np.random.default_rng(derive_seed(cfg.seed, "poison", cid))
            poisoned[cid] = _trainer(cfg, attack.poison_data(data.train[cid], rng=rng), None)
    checks = list(validators(_trainer(cfg, None, val) if val else None)) if validators else []
    server = _trainer(cfg, None, test)
    backdoor = None
    if attack is not None and attack.kind in ("backdoor", "model_replacement"):
        p = attack.params
        backdoor = _trainer(
            cfg,
            None,
            backdoor_test_set(test, target=p["target"], size=p["size"], value=p["value"]),
        )
    weights = server.initial_weights(init_seed(cfg.seed))
    result = SimResult(attackers=attackers)
    for rnd in range(1, cfg.rounds + 1):
        active = attack is not None and attack.active(rnd)
        honest: dict[str, tuple[Mapping[str, Any], int]] = {}
        for cid in ids:
            fit = FitConfig(
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                seed=fit_seed(cfg.seed, rnd, cid),
            )
            trainer = trainers[cid]
            if active and cid in poisoned:
                trainer = poisoned[cid]
                assert attack is not None
                if attack.params.get("epochs"):
                    fit = FitConfig(
                        epochs=int(attack.params["epochs"]),
                        batch_size=cfg.batch_size,
                        lr=cfg.lr,
                        seed=fit.seed,
                    )
            out = trainer.fit(weights, fit)
            honest[cid] = (out.weights, out.num_examples)
        sent = {cid: w for cid, (w, _) in honest.items()}
        if active and attack is not None and attack.poisons_model:
            peers = [honest[c][0] for c in ids]
            total = sum(n for _, n in honest.values())
            for cid in attackers:
                ctx = AttackContext(
                    honest=honest[cid][0],
                    global_weights=weights,
                    peers=peers,
                    num_clients=len(ids),
                    num_attackers=len(attackers),
                    own_examples=honest[cid][1],
                    total_examples=total,
                    rng=np.random.default_rng([cfg.seed, rnd, zlib.crc32(cid.encode())]),
                )
                sent[cid] = attack.poison_update(ctx)
        updates = [
            ClientUpdate(sender=cid, weights=sent[cid], num_examples=honest[cid][1], round=rnd)
            for cid in ids
        ]
        rejected: dict[str, str] = {}
        for check in checks:
            verdict = check.validate(weights, updates, round=rnd)
            rejected.update(verdict)
            updates = [u for u in updates if u.sender not in verdict]
        result.rejected.append(rejected)
        if updates:
            weights = aggregator.aggregate(weights, updates, round=rnd)
        result.accuracy.append(server.evaluate(weights).accuracy)
        if backdoor is not None:
            result.backdoor_success.append(backdoor.evaluate(weights).accuracy)
    result.weights = dict(weights)
    return result

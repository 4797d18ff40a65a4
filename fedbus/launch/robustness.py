"""Defenses and simulated attacks of a topology, as the launcher wires them into nodes.

Defenses (``protocol.validators``) run in the aggregating node: `server_defenses`
builds them with `fedbus.aggregation.make_validators`, and for
``validation_accuracy`` injects an evaluator over a validation set cut from
the held-out split (so it stays disjoint from the test split the reported
accuracy uses). When a backdoor attack is configured, the server's evaluator
also scores triggered test inputs relabelled to the target, reported per
round as ``backdoor_accuracy``.

Attacks (``attacks``) run inside the attacking client nodes, in simulation
only (`AttackPlan`, `ClientAttack`): data poisoning trains on a copy of the
client's partition poisoned at build time; model poisoning replaces the
update before it is sent. Omniscient attacks (ALIE, IPM) need the round's
honest updates: here a `Collusion` object in the launcher's process shares
the colluding attackers' own honest updates among them. That is a
simulation shortcut (real colluders would need a side channel), and they
see only their own coalition's updates, not every client's as the
one-process loop of `fedbus.attacks.simulate` lets them.

`check_aggregator` is the topology loader's hook onto the aggregator
registry, so ``fedbus validate`` reports unknown aggregators, bad parameters
and bounds (Bulyan's n >= 4f + 3 against the updates per round) with paths.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.aggregation import Validator, make_aggregator, make_validators
from fedbus.attacks import Attack, AttackContext, backdoor_test_set
from fedbus.errors import ConfigError
from fedbus.launch.build import model_spec
from fedbus.learning.data import Dataset
from fedbus.learning.partition import FederationData
from fedbus.learning.seeds import derive_seed
from fedbus.learning.trainer import EvalResult, FitConfig, FitResult, NamedArrays, Trainer
from fedbus.learning.trainers import make_trainer
from fedbus.messages import ALL_SELECTED
from fedbus.topology import AggregatorSpec, Topology
from fedbus.topology.robustness import AttackSpec

__all__ = [
    "AttackPlan",
    "BackdoorEvaluator",
    "ClientAttack",
    "Collusion",
    "ServerDefenses",
    "check_aggregator",
    "data_trainer",
    "describe_attacks",
    "server_defenses",
    "split_validation",
    "unsupported_robustness",
]

Arrays = Mapping[str, npt.NDArray[Any]]

_AGGREGATOR = "protocol.aggregator"
_OMNISCIENT = frozenset({"alie", "ipm"})
_BACKDOORS = frozenset({"backdoor", "model_replacement"})


def check_aggregator(
    spec: AggregatorSpec, *, updates_per_round: int | None = None
) -> list[str | tuple[str, str]]:
    """The topology loader's ``check_aggregator`` hook: build the spec, check its bound.

    Returns ``(path relative to the spec, message)`` per problem: an unknown
    name or factory, a bad parameter, or (when the updates per round are
    known) a bound such as Bulyan's ``n >= 4f + 3`` that the round cannot meet.
    """
    try:
        aggregator = make_aggregator(spec.as_dict())
    except ConfigError as exc:
        return [(_relative(exc.path), exc.message)]
    bound = getattr(type(aggregator), "check_bound", None)
    f = getattr(aggregator, "f", None)
    if updates_per_round is not None and callable(bound) and isinstance(f, int):
        try:
            bound(updates_per_round, f)
        except ConfigError as exc:
            return [(_relative(exc.path), exc.message)]
    return []


def unsupported_robustness(topology: Topology) -> str | None:
    """Why this topology's validators or attacks would not run (None: they will).

    The centralized and hierarchical runtimes wire them (the latter at every
    level, `fedbus.launch.hierarchical_defenses`), and so does gossip with
    Metropolis mixing (every peer, `fedbus.launch.gossip_robust`); running
    another kind without them would report an attacked run as a clean one.
    """
    kind = topology.protocol.kind
    if kind == "gossip" and topology.protocol.mixing != "metropolis" and topology.attacks:
        return "attacks at gossip peers run with mixing 'metropolis' only (push-sum sends shares)"
    wired = ("centralized", "hierarchical", "gossip")
    if kind not in wired and (topology.attacks or topology.protocol.validators):
        return (
            f"protocol.validators and attacks run under 'centralized' only so far (and "
            f"'hierarchical'); the {kind!r} runtime would ignore them"
        )
    return None


def _relative(path: str | None) -> str:
    if not path or path == _AGGREGATOR:
        return ""
    return path[len(_AGGREGATOR) + 1 :] if path.startswith(_AGGREGATOR + ".") else path


def describe_attacks(topology: Topology) -> list[dict[str, Any]]:
    """Each attack with its effective parameters and attackers (printed and in summary.json)."""
    out: list[dict[str, Any]] = []
    for spec, nodes in zip(topology.attacks, topology.attackers(), strict=True):
        attack = spec.attack()
        out.append(
            {
                "kind": attack.kind,
                "describe": attack.describe(),
                "params": dict(attack.params),
                "nodes": list(nodes),
                "rounds": list(spec.rounds) if spec.rounds else None,
            }
        )
    return out


# -- the server's side ------------------------------------------------------------------


@dataclass(slots=True)
class ServerDefenses:
    """What the server node needs beyond the plain runtime.

    Attributes:
        data: the federation data with the validation share cut from its test split.
        validators: the ``protocol.validators`` chain, evaluator injected.
        validation: the validation set (``validation_accuracy`` only).
        summary: extra summary.json keys (``attacks``, ``validators``).
    """

    data: FederationData
    validators: list[Validator] = field(default_factory=list)
    validation: Dataset | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def evaluator(self, topology: Topology, trainer: Trainer) -> Trainer:
        """``trainer``, or a `BackdoorEvaluator` around it when a backdoor attack is configured."""
        for spec in topology.attacks:
            attack = spec.attack()
            if attack.kind in _BACKDOORS:
                p = attack.params
                triggered = backdoor_test_set(
                    self.data.test, target=int(p["target"]), size=int(p["size"]),
                    value=float(p["value"]),
                )  # fmt: skip
                return BackdoorEvaluator(trainer, data_trainer(topology, self.data, test=triggered))
        return trainer


def server_defenses(topology: Topology, data: FederationData) -> ServerDefenses:
    """Cut the validation set, build the validators, and the summary's robustness keys.

    Raises:
        ConfigError: the validation share leaves an empty validation or test set.
    """
    fraction = max((v.fraction for v in topology.protocol.validators), default=0.0)
    data, validation = split_validation(topology, data, fraction)
    specs: list[dict[str, Any]] = []
    for v in topology.protocol.validators:
        spec = v.as_dict()
        if v.kind == "validation_accuracy":
            assert validation is not None
            spec["evaluate"] = data_trainer(topology, data, test=validation)
        specs.append(spec)
    summary: dict[str, Any] = {}
    if topology.protocol.validators:
        summary["validators"] = [v.as_dict() for v in topology.protocol.validators]
    if topology.attacks:
        summary["attacks"] = describe_attacks(topology)
    return ServerDefenses(data, make_validators(specs), validation, summary)


def data_trainer(
    topology: Topology,
    data: FederationData,
    *,
    train: Dataset | None = None,
    test: Dataset | None = None,
) -> Trainer:
    """The topology's trainer on ``train`` and/or ``test``, sized by the federation's data."""
    return make_trainer(
        model_spec(topology), train, test,
        num_features=data.num_features, num_classes=data.num_classes, seed=topology.seed,
    )  # fmt: skip


def split_validation(
    topology: Topology, data: FederationData, fraction: float
) -> tuple[FederationData, Dataset | None]:
    """Cut ``fraction`` of the held-out split off as the validation set (seeded).

    Returns the data with the rest as its test split, and the validation set
    (None, and the data unchanged, when ``fraction`` is 0). Every aggregating
    level of a run shares this one cut.

    Raises:
        ConfigError: the share leaves an empty validation or test set.
    """
    if fraction <= 0:
        return data, None
    test = data.test
    order = np.random.default_rng(derive_seed(topology.seed, "validation")).permutation(len(test))
    cut = round(fraction * len(test))
    if not 0 < cut < len(test):
        raise ConfigError(
            f"validation_fraction {fraction} of the {len(test)} held-out examples leaves "
            "an empty validation or test set",
            path="protocol.validators",
        )
    validation = test.subset(np.sort(order[:cut]))
    return dataclasses.replace(data, test=test.subset(np.sort(order[cut:]))), validation


class BackdoorEvaluator:
    """The server's evaluator plus the backdoor's success rate, as ``backdoor_accuracy``.

    Args:
        inner: evaluates on the test split (and makes initial weights).
        triggered: evaluates on triggered non-target test inputs labelled with the target.
    """

    def __init__(self, inner: Trainer, triggered: Trainer) -> None:
        self.inner = inner
        self.triggered = triggered

    def initial_weights(self, seed: int) -> NamedArrays:
        """The inner trainer's initial weights."""
        return self.inner.initial_weights(seed)

    def fit(self, weights: Mapping[str, np.ndarray[Any, Any]], config: FitConfig) -> FitResult:
        """Not used on the server; delegated for completeness."""
        return self.inner.fit(weights, config)

    def evaluate(self, weights: Mapping[str, np.ndarray[Any, Any]]) -> EvalResult:
        """Test-split loss and accuracy, with ``backdoor_accuracy`` in ``metrics``."""
        result = self.inner.evaluate(weights)
        success = self.triggered.evaluate(weights).accuracy
        metrics = {**result.metrics, "backdoor_accuracy": float(success)}
        return dataclasses.replace(result, metrics=metrics)


# -- the attackers' side ----------------------------------------------------------------


class Collusion:
    """Shares the honest updates of one attack's colluders within a round (simulation only).

    Every attacker of the round posts its honest update and waits until each
    colluder selected that round has posted, or ``wait_s`` passes (a colluder
    may have dropped out). Rounds are told apart by the global model's digest,
    so a retried round does not mix in the failed attempt's updates.
    """

    def __init__(self, members: Sequence[str], *, wait_s: float) -> None:
        self.members = frozenset(members)
        self.wait_s = wait_s
        self._posted: dict[tuple[int, bytes], dict[str, Arrays]] = {}
        self._changed = asyncio.Condition()

    async def share(
        self,
        round_num: int,
        global_weights: Arrays,
        node: str,
        honest: Arrays,
        expected: frozenset[str] | set[str],
    ) -> list[Arrays]:
        """Post ``honest``; return the colluders' honest updates (``node``'s included)."""
        key = (round_num, _digest(global_weights))
        async with self._changed:
            for old in [k for k in self._posted if k[0] < round_num - 1]:
                del self._posted[old]
            posted = self._posted.setdefault(key, {})
            posted[node] = honest
            self._changed.notify_all()
            try:
                async with asyncio.timeout(self.wait_s):
                    await self._changed.wait_for(lambda: expected <= posted.keys())
            except TimeoutError:
                pass
            return [posted[name] for name in sorted(posted)]


def _digest(weights: Arrays) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        h.update(name.encode())
        h.update(np.ascontiguousarray(weights[name]).tobytes())
    return h.digest()


class ClientAttack:
    """What one attacking client does instead of honest training (the `ClientNode` hook).

    Outside its active rounds it returns None and the node trains honestly.
    In an active round it trains on its poisoned data (data attacks) and/or
    replaces the update (model attacks) before the node sends it.
    """

    def __init__(
        self,
        node_id: str,
        attack: Attack,
        spec: AttackSpec,
        *,
        honest: Trainer,
        poisoned: Trainer | None,
        seed: int,
        per_round: int,
        examples: Mapping[str, int],
        collusion: Collusion | None,
    ) -> None:
        self.node_id = node_id
        self.attack = attack
        self.spec = spec
        self.honest = honest
        self.poisoned = poisoned
        self._seed = seed
        self._per_round = per_round
        self._examples = examples
        self._collusion = collusion

    async def fit(
        self, round_num: int, weights: Arrays, config: FitConfig, selected: Sequence[str]
    ) -> FitResult | None:
        """The forged result for ``round_num``, or None to train honestly."""
        if not self.spec.active(round_num):
            return None
        trainer = self.honest
        if self.attack.poisons_data and self.poisoned is not None:
            trainer = self.poisoned
            epochs = self.attack.params.get("epochs")
            if epochs:
                config = dataclasses.replace(config, epochs=int(epochs))
        result = await asyncio.to_thread(trainer.fit, weights, config)
        if not self.attack.poisons_model:
            return result
        honest = _dense(result, weights)
        if ALL_SELECTED in selected:  # ["*"]: every live client; the simulation's clients
            selected = tuple(self._examples)
        peers: list[Arrays] = []
        colluders = self._collusion.members if self._collusion else frozenset({self.node_id})
        chosen = set(selected) if selected else set(colluders)
        expected = (colluders & chosen) | {self.node_id}
        if self._collusion is not None and self.attack.kind in _OMNISCIENT:
            peers = await self._collusion.share(round_num, weights, self.node_id, honest, expected)
        elif self.attack.kind in _OMNISCIENT:
            peers = [honest]
        n = len(selected) if selected else self._per_round
        total = sum(self._examples.get(name, result.num_examples) for name in selected) or None
        ctx = AttackContext(
            honest=honest, global_weights=weights, peers=peers, num_clients=max(n, 1),
            num_attackers=min(len(expected), max(n, 1)), own_examples=result.num_examples,
            total_examples=total,
            rng=np.random.default_rng([self._seed, round_num, zlib.crc32(self.node_id.encode())]),
        )  # fmt: skip
        with np.errstate(all="ignore"):  # an overflowing poisoned model is the attack working
            forged = self.attack.poison_update(ctx)
        if result.is_delta:
            forged = {k: np.asarray(v) - np.asarray(weights[k]) for k, v in forged.items()}
        return dataclasses.replace(result, weights=forged)


def _dense(result: FitResult, weights: Arrays) -> dict[str, npt.NDArray[Any]]:
    if not result.is_delta:
        return {k: np.asarray(v) for k, v in result.weights.items()}
    return {k: np.asarray(weights[k]) + np.asarray(v) for k, v in result.weights.items()}


class AttackPlan:
    """Who attacks how in a ``fedbus run`` simulation; builds each attacker's `ClientAttack`.

    Args:
        topology: the topology (its ``attacks`` and seed).
        data: the federation data (partitions to poison, sizes for model replacement).
    """

    def __init__(self, topology: Topology, data: FederationData) -> None:
        self.topology = topology
        self.data = data
        clients = len(topology.nodes.clients) or len(topology.attack_pool())
        self._per_round = topology.protocol.selected_per_round(max(clients, 1))
        self._wait_s = min(topology.protocol.round_timeout_s / 2, 10.0)
        self._by_node: dict[str, tuple[AttackSpec, Attack, Collusion | None]] = {}
        for spec, nodes in zip(topology.attacks, topology.attackers(), strict=True):
            attack = spec.attack()
            collusion = (
                Collusion(nodes, wait_s=self._wait_s) if attack.kind in _OMNISCIENT else None
            )
            for node in nodes:
                self._by_node[node] = (spec, attack, collusion)

    @property
    def attackers(self) -> dict[str, str]:
        """Attacking node -> attack kind."""
        return {node: attack.kind for node, (_, attack, _) in sorted(self._by_node.items())}

    def poisoned_data(self, node_id: str) -> Dataset | None:
        """``node_id``'s poisoned training data (data attacks only; None otherwise)."""
        entry = self._by_node.get(node_id)
        if entry is None or not entry[1].poisons_data or node_id not in self.data.train:
            return None
        rng = np.random.default_rng(derive_seed(self.topology.seed, "poison", node_id))
        return entry[1].poison_data(self.data.train[node_id], rng=rng)

    def poisoned_trainer(self, node_id: str) -> Trainer | None:
        """A trainer on ``node_id``'s poisoned partition (None unless it poisons data)."""
        bad = self.poisoned_data(node_id)
        return None if bad is None else data_trainer(self.topology, self.data, train=bad)

    def client_attack(self, node_id: str, honest: Trainer) -> ClientAttack | None:
        """The attack hook of ``node_id`` (None for an honest node)."""
        entry = self._by_node.get(node_id)
        if entry is None:
            return None
        spec, attack, collusion = entry
        return ClientAttack(
            node_id, attack, spec, honest=honest, poisoned=self.poisoned_trainer(node_id),
            seed=self.topology.seed,
            per_round=self._per_round, examples={k: len(v) for k, v in self.data.train.items()}, collusion=collusion,
        )  # fmt: skip

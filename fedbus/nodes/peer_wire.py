"""A gossip peer's models on the wire, and what a simulated Byzantine peer sends instead.

`model_event` and `model_update` translate between the machine's `SendModel`
/ `PeerModelReceived` / `PeerSnapshotReceived` and the ``ModelUpdate``
message: the sender's graph ``degree`` and push-sum ``mass`` travel in its
metrics map, and a rejoin-sync snapshot is flagged ``sync``.

`PeerAttack` is the gossip side of ``attacks:`` (simulation only, issue 5).
A Byzantine peer keeps training and mixing honestly, so that its own state
stays realistic, but every model it sends, snapshots included, is the
attack's forgery of the honest one: the update it poisons is its trained
model minus the model the round started from (zero in a mixing-only round,
where a Gaussian attacker still sends noise). Data attacks need no hook: the
launcher gives the attacker a trainer on its poisoned partition.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus._types import NodeId, RunId
from fedbus.attacks import Attack, AttackContext
from fedbus.messages import ModelUpdate, tensors_from_arrays, tensors_to_arrays
from fedbus.protocols.base import Event
from fedbus.protocols.gossip_types import PeerModelReceived, PeerSnapshotReceived, SendModel
from fedbus.topology.robustness import AttackSpec

__all__ = ["PeerAttack", "model_event", "model_update"]

Arrays = Mapping[str, npt.NDArray[Any]]


def model_event(msg: ModelUpdate) -> Event:
    """The machine's event for a neighbour's ``ModelUpdate`` (a model, or a sync snapshot)."""
    metrics, sender, run = msg.metrics, NodeId(msg.sender), RunId(msg.run)
    weights = tensors_to_arrays(msg.weights)
    if metrics.get("sync"):
        return PeerSnapshotReceived(sender=sender, run=run, round=msg.round, weights=weights)
    degree, mass = metrics.get("degree", 0), metrics.get("mass", 1.0)
    return PeerModelReceived(
        sender=sender, run=run, round=msg.round, weights=weights,
        degree=int(degree) if isinstance(degree, int | float) else -1,
        mass=float(mass) if isinstance(mass, int | float) else float("nan"),
    )  # fmt: skip


def model_update(
    command: SendModel, weights: Arrays, *, run: RunId, sender: str, num_examples: int
) -> ModelUpdate:
    """The ``ModelUpdate`` carrying ``weights`` for ``command`` (one per addressee, same body)."""
    metrics: dict[str, bool | int | float | str] = {
        "degree": command.degree, "mass": float(command.mass),
    }  # fmt: skip
    if command.sync:
        metrics["sync"] = 1
    return ModelUpdate(
        run=run, round=command.round, sender=sender, weights=tensors_from_arrays(weights),
        num_examples=num_examples, metrics=metrics,
    )  # fmt: skip


class PeerAttack:
    """What one Byzantine peer sends instead of its honest models (see the module docstring).

    Args:
        node_id: the attacking peer.
        attack: the configured attack (effective parameters).
        spec: its ``attacks:`` entry (the rounds it is active in).
        degree: the peer's graph degree (the attack's n is degree + 1: a
            neighbour mixes that many models, its own included).
        seed: the run's seed (each round's randomness derives from it).
    """

    def __init__(
        self, node_id: str, attack: Attack, spec: AttackSpec, *, degree: int, seed: int
    ) -> None:
        self.node_id = node_id
        self.attack = attack
        self.spec = spec
        self.degree = degree
        self._seed = seed

    def forge(self, round_: int, honest: Arrays, start: Arrays) -> Arrays | None:
        """The forged model for ``round_`` (None: send ``honest``, inactive or a data attack).

        Args:
            round_: the round the model belongs to.
            honest: the model the machine would send.
            start: the model the round's training started from.
        """
        if not self.attack.poisons_model or not self.spec.active(round_):
            return None
        rng = np.random.default_rng([self._seed, round_, zlib.crc32(self.node_id.encode())])
        ctx = AttackContext(
            honest=honest, global_weights=start, peers=[honest], num_clients=self.degree + 1,
            num_attackers=1, rng=rng,
        )  # fmt: skip
        with np.errstate(all="ignore"):  # an overflowing forgery is the attack working
            return self.attack.poison_update(ctx)

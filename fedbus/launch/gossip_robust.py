"""Issue 5 at the gossip peers: each peer's defense and, in simulation, its attack.

Every peer is an aggregating node, so it gets its own defense
(`fedbus.protocols.gossip_defense.PeerDefense`): its own validator instances
(a cosine check with ``reference: previous`` keeps the peer's last model, so
they cannot be shared) and the robust rule of a non-default
``protocol.aggregator``. The ``validation_accuracy`` gate evaluates on the
same validation share of the held-out split as at a server
(`fedbus.launch.robustness.server_defenses`), which the launcher then leaves
out of the test split the reported accuracy uses.

Attackers are drawn as for the centralized runtime (`Topology.attackers`,
the same seed, among the started peers): a model attack makes the peer
forge what it sends (`fedbus.nodes.peer_wire.PeerAttack`), a data attack
trains it on its poisoned partition.
"""

from __future__ import annotations

from fedbus.aggregation import make_aggregator
from fedbus.launch.robustness import AttackPlan, server_defenses
from fedbus.learning.partition import FederationData
from fedbus.learning.trainer import Trainer
from fedbus.nodes.peer_wire import PeerAttack
from fedbus.protocols.gossip_defense import PeerDefense
from fedbus.topology import AggregatorSpec, Topology

__all__ = ["peer_attack", "peer_defense", "poisoned_trainer"]


def peer_defense(topology: Topology, data: FederationData) -> PeerDefense | None:
    """A fresh defense for one peer (None: plain Metropolis mixing, nothing screened).

    ``data`` is the whole federation data: the validation share is cut from its test split.
    """
    protocol = topology.protocol
    aggregator = None
    if protocol.aggregator != AggregatorSpec():
        aggregator = make_aggregator(protocol.aggregator.as_dict())
    validators = server_defenses(topology, data).validators if protocol.validators else []
    if aggregator is None and not validators:
        return None
    return PeerDefense(aggregator=aggregator, validators=tuple(validators))


def peer_attack(topology: Topology, node_id: str) -> PeerAttack | None:
    """The forging hook of ``node_id`` if it is a simulated model attacker (None otherwise)."""
    degree = len(topology.adjacency().get(node_id, ()))
    for spec, nodes in zip(topology.attacks, topology.attackers(), strict=True):
        if node_id in nodes:
            attack = spec.attack()
            if not attack.poisons_model:
                return None
            return PeerAttack(node_id, attack, spec, degree=degree, seed=topology.seed)
    return None


def poisoned_trainer(topology: Topology, data: FederationData, node_id: str) -> Trainer | None:
    """A trainer on ``node_id``'s poisoned partition if it is a data attacker (None otherwise)."""
    if not topology.attacks:
        return None
    return AttackPlan(topology, data).poisoned_trainer(node_id)

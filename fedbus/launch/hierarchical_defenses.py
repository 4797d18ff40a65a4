"""Defenses of a hierarchical run at every aggregation level (issue 5).

Every aggregating node of a hierarchy (the cloud, each edge or region) runs
its level's ``validators`` (``protocol.validators`` at the cloud, inherited
by the edges unless an edge gives its own list; ``[]`` turns them off there)
in front of its level's aggregator, which may be a robust one. A
``validation_accuracy`` gate at any level evaluates on a validation set cut
from the held-out split exactly as the centralized server's
(`fedbus.launch.robustness.server_defenses`: same seed, the largest
``validation_fraction`` of any level), so the test split the reported
accuracy uses stays disjoint from it; all levels share that one set.

Simulated attackers are devices (`fedbus.launch.robustness.AttackPlan`);
their attacks are active in the listed top-level (cloud) rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedbus.aggregation import Validator, make_validators
from fedbus.launch.robustness import (
    ServerDefenses,
    data_trainer,
    describe_attacks,
    split_validation,
)
from fedbus.learning.data import Dataset
from fedbus.learning.partition import FederationData
from fedbus.topology import NodeRole, Topology

__all__ = ["LevelDefenses", "level_defenses"]

_ACCURACY = "validation_accuracy"


@dataclass(slots=True)
class LevelDefenses:
    """The validators of each aggregating node, and what the cloud reports about them.

    Attributes:
        topology: the run's topology (each level's specs).
        data: the federation data with the validation share cut from its test split.
        validation: the validation set (when some level gates on accuracy).
        summary: summary.json keys: ``validators`` (node -> its specs) and ``attacks``.
    """

    topology: Topology
    data: FederationData
    validation: Dataset | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def validators(self, node: str) -> list[Validator]:
        """Fresh validators for ``node`` (stateful checks must not be shared between nodes)."""
        specs: list[dict[str, Any]] = []
        for spec in self.topology.node(node).validators:
            entry = spec.as_dict()
            if spec.kind == _ACCURACY:
                assert self.validation is not None  # cut whenever a level asks for it
                entry["evaluate"] = data_trainer(self.topology, self.data, test=self.validation)
            specs.append(entry)
        return make_validators(specs)

    def server(self) -> ServerDefenses:
        """The centralized view, for the cloud's evaluator (``backdoor_accuracy``)."""
        return ServerDefenses(self.data, [], self.validation, self.summary)


def level_defenses(topology: Topology, data: FederationData) -> LevelDefenses:
    """Cut the validation set (if any level needs one) and describe every level's defenses.

    Raises:
        ConfigError: the validation share leaves an empty validation or test set.
    """
    levels = [
        info for info in topology.node_infos() if info.role in (NodeRole.SERVER, NodeRole.EDGE)
    ]
    fraction = max((v.fraction for info in levels for v in info.validators), default=0.0)
    data, validation = split_validation(topology, data, fraction)
    summary: dict[str, Any] = {}
    checked = {info.id: [v.as_dict() for v in info.validators] for info in levels}
    if any(checked.values()):
        summary["validators"] = {node: specs for node, specs in checked.items() if specs}
    if topology.attacks:
        summary["attacks"] = describe_attacks(topology)
    return LevelDefenses(topology, data, validation, summary)

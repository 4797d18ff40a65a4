"""The ``protocol:`` section: which FL protocol runs, for how long, with what rules."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

from fedbus.protocols.selection import selection_size
from fedbus.topology.model import AggregatorSpec
from fedbus.topology.problems import Checked
from fedbus.topology.robustness import ValidatorSpec

__all__ = [
    "EVALUATE_MODES",
    "GOSSIP_AGGREGATORS",
    "MIXINGS",
    "MODES",
    "PROTOCOL_KINDS",
    "REHOME_MODES",
    "ProtocolConfig",
]

PROTOCOL_KINDS: Final = ("centralized", "hierarchical", "gossip")
EVALUATE_MODES: Final = ("central", "federated")
REHOME_MODES: Final = ("parent", "sibling")
MIXINGS: Final = ("metropolis", "push_sum")
MODES: Final = ("sync", "async")
GOSSIP_AGGREGATORS: Final = (
    "fedavg", "median", "trimmed_mean", "geometric_median", "krum", "multi_krum", "bulyan",
    "norm_clipping",
)  # fmt: skip
"""Rules a gossip peer may mix with (stateless functions of the models it holds)."""
_ASYNC_DEFAULTS: Final = (
    ("buffer_size", None),
    ("max_staleness", 10),
    ("server_lr", 1.0),
    ("staleness_exponent", 0.5),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolConfig(Checked):
    """Rounds, selection, deadlines and aggregation.

    Keys that belong to one protocol kind keep their defaults under the
    others; a non-default value there is a problem, so a typo'd kind is caught.

    Attributes:
        kind: ``centralized``, ``hierarchical`` or ``gossip``.
        rounds: global rounds to run.
        clients_per_round: clients selected per round (centralized); exclusive
            with ``fraction``. Neither means every client.
        fraction: share of clients selected per round; in hierarchical, share
            of its own devices each edge selects.
        min_clients: quorum that may close a round at its deadline (async: the
            smallest buffer aggregated at the aggregation deadline).
        round_timeout_s: round deadline (async: the longest wait for the next
            accepted update before a partial buffer is flushed or the run ends).
        join_timeout_s: how long to wait for nodes before round 1 (async: added
            to the first wait).
        evaluate: ``central`` (global model on the held-out test split) or
            ``federated`` (sample-weighted mean of the clients' own evaluations).
        aggregator: how updates are combined.
        edge_rounds: local aggregation rounds per global round (hierarchical).
        rehome: where the clients of a dead edge go (hierarchical).
        mixing: ``metropolis`` or ``push_sum`` (gossip).
        lr_decay: per-round multiplicative decay of ``training.lr`` (gossip,
            metropolis): round r trains with ``lr * lr_decay ** (r - 1)``.
        final_mixing_rounds: mixing-only rounds after ``rounds`` (gossip, metropolis).
        validators: update checks every aggregating node runs before aggregating.
        mode: ``sync`` (rounds) or ``async`` (centralized only: FedBuff-style
            buffered aggregation, `fedbus.protocols.fedbuff`; ``rounds`` then
            counts aggregations).
        buffer_size: K, updates per aggregation (async); None: min(10, clients).
        max_staleness: updates trained on a model more than this many versions
            old are rejected (async).
        server_lr: the server's learning rate on the buffered mean delta (async).
        staleness_exponent: a in the weight (1 + staleness) ** -a (async).
    """

    kind: Literal["centralized", "hierarchical", "gossip"] = "centralized"
    rounds: int = 10
    clients_per_round: int | None = None
    fraction: float | None = None
    min_clients: int = 1
    round_timeout_s: float = 30.0
    join_timeout_s: float = 60.0
    evaluate: Literal["central", "federated"] = "central"
    aggregator: AggregatorSpec = field(default_factory=AggregatorSpec)
    edge_rounds: int = 1
    rehome: Literal["parent", "sibling"] = "parent"
    mixing: Literal["metropolis", "push_sum"] = "metropolis"
    lr_decay: float = 1.0
    final_mixing_rounds: int = 0
    validators: tuple[ValidatorSpec, ...] = ()
    mode: Literal["sync", "async"] = "sync"
    buffer_size: int | None = None
    max_staleness: int = 10
    server_lr: float = 1.0
    staleness_exponent: float = 0.5

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.kind not in PROTOCOL_KINDS:
            yield "kind", f"must be one of {', '.join(PROTOCOL_KINDS)}; got {self.kind!r}"
        if self.rounds < 1:
            yield "rounds", f"must be at least 1, got {self.rounds}"
        if self.clients_per_round is not None and self.fraction is not None:
            yield "fraction", "give clients_per_round or fraction, not both"
        if self.clients_per_round is not None and self.clients_per_round < 1:
            yield "clients_per_round", f"must be at least 1, got {self.clients_per_round}"
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            yield "fraction", f"must be in (0, 1], got {self.fraction}"
        if self.min_clients < 1:
            yield "min_clients", f"must be at least 1, got {self.min_clients}"
        for name, value in (
            ("round_timeout_s", self.round_timeout_s),
            ("join_timeout_s", self.join_timeout_s),
        ):
            if not (value > 0 and math.isfinite(value)):
                yield name, f"must be a positive number, got {value}"
        if self.evaluate not in EVALUATE_MODES:
            yield "evaluate", f"must be one of {', '.join(EVALUATE_MODES)}; got {self.evaluate!r}"
        if self.edge_rounds < 1:
            yield "edge_rounds", f"must be at least 1, got {self.edge_rounds}"
        if self.rehome not in REHOME_MODES:
            yield "rehome", f"must be one of {', '.join(REHOME_MODES)}; got {self.rehome!r}"
        if self.mixing not in MIXINGS:
            yield "mixing", f"must be one of {', '.join(MIXINGS)}; got {self.mixing!r}"
        if not (0.0 < self.lr_decay <= 1.0):
            yield "lr_decay", f"must be in (0, 1], got {self.lr_decay}"
        if self.final_mixing_rounds < 0:
            yield "final_mixing_rounds", f"must be at least 0, got {self.final_mixing_rounds}"
        gates = [i for i, v in enumerate(self.validators) if v.kind == "validation_accuracy"]
        if len(gates) > 1:
            yield f"validators[{gates[1]}]", "validation_accuracy may be given once"
        yield from self._kind_problems()
        yield from self._async_problems()

    def _async_problems(self) -> Iterator[tuple[str, str]]:
        """The FedBuff keys: ranges under ``mode: async``, defaults everywhere else.

        Why strict: an async key left under a sync run (or a sync-only key
        under async) would be silently ignored, and the run would not be
        the one the file describes.
        """
        if self.mode not in MODES:
            yield "mode", f"must be one of {', '.join(MODES)}; got {self.mode!r}"
            return
        if self.mode == "sync":
            for name, default in _ASYNC_DEFAULTS:
                if getattr(self, name) != default:
                    yield name, "applies only to mode 'async'"
            return
        if self.kind != "centralized":
            yield "mode", "'async' applies only to protocol kind 'centralized'"
        if self.buffer_size is not None and self.buffer_size < 1:
            yield "buffer_size", f"must be at least 1, got {self.buffer_size}"
        if self.max_staleness < 0:
            yield "max_staleness", f"must be at least 0, got {self.max_staleness}"
        if not (self.server_lr > 0 and math.isfinite(self.server_lr)):
            yield "server_lr", f"must be a positive number, got {self.server_lr}"
        a = self.staleness_exponent
        if not (a >= 0 and math.isfinite(a)):
            yield "staleness_exponent", f"must be a number >= 0, got {a}"
        for name in ("clients_per_round", "fraction"):
            if getattr(self, name) is not None:
                yield name, "not used by mode 'async': every client trains on every model"
        if self.buffer_size is not None and self.min_clients > self.buffer_size:
            yield "min_clients", f"exceeds buffer_size {self.buffer_size}"
        if self.aggregator != AggregatorSpec():
            yield "aggregator", "not used by mode 'async' (staleness-weighted buffered mean)"
        if self.evaluate != "central":
            yield "evaluate", "mode 'async' evaluates centrally (needs a data section)"

    def _kind_problems(self) -> Iterator[tuple[str, str]]:
        if self.kind != "hierarchical":
            if self.edge_rounds != 1:
                yield "edge_rounds", "applies only to protocol kind 'hierarchical'"
            if self.rehome != "parent":
                yield "rehome", "applies only to protocol kind 'hierarchical'"
        if self.kind != "gossip" and self.mixing != "metropolis":
            yield "mixing", "applies only to protocol kind 'gossip'"
        for name, default in (("lr_decay", 1.0), ("final_mixing_rounds", 0)):
            if getattr(self, name) != default and (
                self.kind != "gossip" or self.mixing != "metropolis"
            ):
                yield name, "applies only to protocol kind 'gossip' with mixing 'metropolis'"
        if self.kind == "hierarchical" and self.aggregator.kind == "scaffold":
            from fedbus.topology.nodes import SCAFFOLD_REFUSAL

            yield "aggregator", SCAFFOLD_REFUSAL
        if self.kind == "hierarchical" and self.clients_per_round is not None:
            yield "clients_per_round", "not used by 'hierarchical': each edge selects a fraction"
        if self.kind == "gossip":
            for name in ("clients_per_round", "fraction"):
                if getattr(self, name) is not None:
                    yield name, "not used by 'gossip': every peer trains every round"
            if self.min_clients != 1:
                yield "min_clients", "not used by 'gossip'"
            yield from self._peer_defense_problems()

    def _peer_defense_problems(self) -> Iterator[tuple[str, str]]:
        """A gossip peer's robust rule and validators (`fedbus.protocols.gossip_defense`)."""
        robust = self.aggregator != AggregatorSpec()
        if self.mixing != "metropolis":
            if robust:
                yield "aggregator", "a peer's robust rule applies only to mixing 'metropolis'"
            if self.validators:
                yield (
                    "validators",
                    "apply only to mixing 'metropolis' (push-sum shares are not models)",
                )
            return
        kind = self.aggregator.kind
        if robust and kind is not None and kind not in GOSSIP_AGGREGATORS:
            yield (
                "aggregator",
                (
                    f"a gossip peer combines models with one of {', '.join(GOSSIP_AGGREGATORS)}; "
                    f"{kind!r} keeps server state or needs more than the models"
                ),
            )

    def selected_per_round(self, available: int) -> int:
        """How many of ``available`` clients a round selects.

        ``clients_per_round`` (capped at ``available``), else
        ``max(1, floor(fraction * available))`` as in McMahan et al.,
        else all of them.
        """
        return selection_size(
            available,
            clients_per_round=self.clients_per_round,
            fraction=self.fraction,
            min_clients=1,
        )

"""Rejoin sync of a synchronous gossip peer: which snapshots to wait for, and their mean.

A peer back from an absence (`Rejoined`, fed by the runtime once its Joins
were answered) does not train on from its stale model: it waits (at most
``round_timeout_s``) for a snapshot of the current model of each neighbour
that answered, adopts their mean, and goes on with the round after the
newest round they completed (so it neither replays rounds nor drags stale
parameters back in). Its own stale model and any model received before it
left are discarded. A neighbour announcing itself with a Join
(`NeighbourJoined` with ``wants_model``) is answered with such a snapshot
(`SendModel` with ``sync``): also before round 1 is done (the initial
model, round 0) and after the last round (the runtime lingers briefly for
it). If the neighbours completed the last round, the returning peer reports
the adopted model as that round's and finishes. This is the "pull the
current model from neighbours on (re)join" rule of practical gossip systems
(e.g. the bootstrapping of new nodes in Gossip Learning, Ormandi et al.
2013; Hegedus et al. 2021); without it a returning peer would train alone
from a model ``down_rounds`` rounds old and its neighbours would mix it back in.
After the sync the peer counts the newest round in the snapshots as
completed, so the snapshots it sends in turn carry that round, not the one
it left in (a stale label made a returning neighbour restart rounds behind).

A neighbour that is back while we wait for round ``r``'s models also gets
our round-``r`` model: it went out before the neighbour returned, and
without it the neighbour, resuming at an earlier round, would wait for it
until its deadline instead of seeing that we moved on.

Who is waited for. Every neighbour that answered, except those that cannot
answer: a neighbour whose will or Leave arrives meanwhile, and one that sends
a Join of its own (it is back from an absence too, so it is syncing and
sends no snapshot; two adjacent peers returning together would otherwise
each wait a whole round deadline for the other). Such a neighbour may still
wait for ours (when its Join reached us first, we never sent it one of our
own), so it is owed the adopted model once this sync is done. Measured on 16 peers with
20% churn, such waits stalled the neighbours that waited in turn for the
syncing peer's model, and the stall spread through the graph every few rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedbus._types import NodeId
from fedbus.aggregation import Arrays
from fedbus.protocols.gossip_defense import PeerDefense
from fedbus.protocols.gossip_types import PeerSnapshotReceived
from fedbus.protocols.mixing import mix

__all__ = ["RejoinSync"]


@dataclass(slots=True)
class RejoinSync:
    """One rejoin sync in progress.

    Attributes:
        expected: neighbours whose snapshot is waited for.
        snapshots: the snapshots received, by sender (any neighbour's counts).
        owed: neighbours that asked for our snapshot while we were syncing;
            they get the adopted model once the sync is done.
    """

    expected: set[NodeId]
    snapshots: dict[NodeId, PeerSnapshotReceived] = field(default_factory=dict)
    owed: set[NodeId] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        """Every expected snapshot is in."""
        return self.expected <= set(self.snapshots)

    def add(self, snapshot: PeerSnapshotReceived) -> None:
        """Keep ``snapshot`` (a second one from the same sender replaces the first)."""
        self.snapshots[snapshot.sender] = snapshot

    def excuse(self, node: NodeId) -> None:
        """Stop waiting for ``node``'s snapshot (it left, or it is syncing too)."""
        self.expected.discard(node)

    def adopt(
        self, like: Arrays, defense: PeerDefense | None = None
    ) -> tuple[dict[str, Any], dict[str, float], int] | None:
        """The adopted model, its coefficients and the newest round in it (None: no snapshot).

        The plain mean of the snapshots, or the defense's aggregator over them
        (a Byzantine neighbour's snapshot would otherwise pull a returning
        peer as far as it likes).
        """
        if not self.snapshots:
            return None
        snapshots = dict(sorted(self.snapshots.items()))
        done = max(m.round for m in snapshots.values())
        models: dict[str, Arrays] = {str(k): m.weights for k, m in snapshots.items()}
        if defense is not None and defense.aggregator is not None:
            combined = defense.combine(models, like=like, round=done)
            if combined is not None:
                return combined, {}, done
        share = 1.0 / len(snapshots)
        coefficients = {str(k): share for k in snapshots}
        return mix(models, coefficients, like=like), coefficients, done

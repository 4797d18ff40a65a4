r"""The faults target's yardstick: how much accuracy the faults themselves cost.

Issue 3 asks that, with ``dropout: 0.3`` and 3 clients crashed for good at
round 2 (examples/faults.yaml: digits, 20 clients, Dirichlet(0.5), MLP 32,
30 rounds), accuracy stays within 2 points of the fault-free run. This
one-process loop (no bus; the trainers, seeds and weighted average of
``reference_fedavg.py``) applies the same faults, for several independent
draws of who drops out, so a fedbus result can be judged against what the
experiment allows rather than against the fault-free run alone. One more run
draws the dropouts as ``fedbus run`` does (`fedbus.nodes.faults.FaultPlan`,
the topology's seed): it replays benchmarks/bench_fedavg.py's faulty run,
provided every client that answers does so before the 5 s deadline.

``--aggregator SPEC`` (repeatable; a name or a JSON mapping as
``protocol.aggregator`` takes it) runs the same draws with fedbus
aggregators, the server side of the loop being ``make_aggregator(SPEC)``
fed `ClientUpdate`s in sorted client order; the yardstick stays the
fault-free run of plain FedAvg (``reference_fedavg.fedavg``)::

    .venv/bin/python benchmarks/reference_faults.py --draws 6
    .venv/bin/python benchmarks/reference_faults.py --draws 6 --clean \
        --aggregator mifa --aggregator '{"kind": "mifa", "server_lr": 1.5}'
    .venv/bin/python benchmarks/reference_faults.py --faults crash   # one fault at a time

``--clean`` adds each rule's own fault-free run, so the cost of the faults to
a rule that also changes the fault-free result (a server step above 1) shows.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_fedavg as ref

from fedbus.aggregation import ClientUpdate, make_aggregator
from fedbus.learning.partition import build_federation_data
from fedbus.learning.seeds import fit_seed, init_seed
from fedbus.learning.trainer import FitConfig
from fedbus.learning.trainers import make_trainer
from fedbus.nodes.faults import FaultPlan

CRASHED = frozenset({"client-3", "client-7", "client-11"})


def run(
    seed: int,
    dropout: float,
    crashed: frozenset[str],
    drop_seed: int | None,
    rounds: int,
    aggregator: Any = None,
) -> float:
    """Final test accuracy where crashed clients stop at round 2 and others drop out.

    ``drop_seed`` None draws the dropouts as fedbus's clients do (`FaultPlan`
    with the run's seed), so the loop replays the ``fedbus run`` of the same
    topology; an int draws them from ``random.Random(drop_seed)``.
    ``aggregator`` None averages with ``reference_fedavg.fedavg``; otherwise it
    is an aggregator spec, built fresh for the run (its state lives across rounds).
    """
    ids = ref.client_ids(20)
    data = build_federation_data(
        "digits", {}, "dirichlet", {"alpha": 0.5}, ids, test_fraction=0.2, seed=seed
    )
    dims = {"num_features": data.num_features, "num_classes": data.num_classes}
    model = {"kind": "mlp", "hidden": [32]}
    trainers = {c: make_trainer(model, data.train[c], None, **dims, seed=seed) for c in ids}
    server = make_trainer(model, None, data.test, **dims, seed=seed)
    weights = server.initial_weights(init_seed(seed))
    agg = None if aggregator is None else make_aggregator(aggregator)
    rng = random.Random(drop_seed)
    plans = {c: FaultPlan(node_id=c, seed=seed, dropout=dropout) for c in ids}
    for rnd in range(1, rounds + 1):
        updates = {}
        for cid in ids:
            if rnd >= 2 and cid in crashed:
                continue
            if plans[cid].drops(rnd) if drop_seed is None else rng.random() < dropout:
                continue
            cfg = FitConfig(epochs=1, batch_size=16, lr=0.05, seed=fit_seed(seed, rnd, cid))
            result = trainers[cid].fit(weights, cfg)
            updates[cid] = (result.weights, result.num_examples)
        if agg is None:
            weights = ref.fedavg(updates)
        else:
            batch = [
                ClientUpdate(sender=c, weights=w, num_examples=n)
                for c, (w, n) in sorted(updates.items())
            ]
            weights = agg.aggregate(weights, batch, round=rnd)
    return server.evaluate(weights).accuracy


def _spec(text: str) -> Any:
    return json.loads(text) if text.lstrip().startswith("{") else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--aggregator",
        action="append",
        type=_spec,
        metavar="SPEC",
        help="a protocol.aggregator spec (name or JSON); repeat to compare rules",
    )
    parser.add_argument(
        "--clean", action="store_true", help="also run each --aggregator without faults"
    )
    parser.add_argument(
        "--faults", choices=("both", "dropout", "crash"), default="both", help="which faults"
    )
    args = parser.parse_args()
    dropout = 0.0 if args.faults == "crash" else 0.3
    crashed = frozenset() if args.faults == "dropout" else CRASHED
    clean = run(args.seed, 0.0, frozenset(), 0, args.rounds)
    print(f"fault-free FedAvg: {clean:.4f}")
    rules: list[Any] = [None, *(args.aggregator or [])]
    for rule in rules:
        label = "FedAvg (reference loop)" if rule is None else json.dumps(rule)
        faulty = [run(args.seed, dropout, crashed, d, args.rounds, rule) for d in range(args.draws)]
        if faulty:
            _report(f"{label}, faults vs fault-free FedAvg", faulty, clean)
        replay = run(args.seed, dropout, crashed, None, args.rounds, rule)
        print(f"{label}, faults drawn as fedbus run draws them: {replay:.4f} "
              f"({100 * (replay - clean):+.1f} points)")  # fmt: skip
        if rule is not None and args.clean:
            alone = run(args.seed, 0.0, frozenset(), 0, args.rounds, rule)
            print(f"{label}, fault-free: {alone:.4f} ({100 * (alone - clean):+.1f} points)")
            if faulty:
                _report(f"{label}, faults vs its own fault-free run", faulty, alone)


def _report(label: str, faulty: list[float], yardstick: float) -> None:
    """One line: points per draw against ``yardstick``, their mean, draws within 2 points."""
    points = [100 * (acc - yardstick) for acc in faulty]
    per_draw = " / ".join(f"{p:+.1f}" for p in points)
    within = sum(p >= -2.0 for p in points)
    mean = statistics.mean(faulty)
    print(
        f"{label}: {per_draw} points; mean {mean:.4f} ({100 * (mean - yardstick):+.1f}); "
        f"no more than 2 points below on {within} of {len(faulty)}",
        flush=True,
    )


if __name__ == "__main__":
    main()

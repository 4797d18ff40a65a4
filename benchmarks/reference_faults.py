"""The faults target's yardstick: how much accuracy the faults themselves cost.

Issue 3 asks that, with ``dropout: 0.3`` and 3 clients crashed for good at
round 2 (examples/faults.yaml: digits, 20 clients, Dirichlet(0.5), MLP 32,
30 rounds), accuracy stays within 2 points of the fault-free run. This
one-process loop (no bus; the trainers, seeds and weighted average of
``reference_fedavg.py``) applies the same faults, for several independent
draws of who drops out, so a fedbus result can be judged against what the
experiment allows rather than against the fault-free run alone::

    .venv/bin/python benchmarks/reference_faults.py --draws 6
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_fedavg as ref

from fedbus.learning.partition import build_federation_data
from fedbus.learning.seeds import fit_seed, init_seed
from fedbus.learning.trainer import FitConfig
from fedbus.learning.trainers import make_trainer

CRASHED = frozenset({"client-3", "client-7", "client-11"})


def run(seed: int, dropout: float, crashed: frozenset[str], drop_seed: int, rounds: int) -> float:
    """Final test accuracy of FedAvg where crashed clients stop at round 2 and others drop out."""
    ids = ref.client_ids(20)
    data = build_federation_data(
        "digits", {}, "dirichlet", {"alpha": 0.5}, ids, test_fraction=0.2, seed=seed
    )
    dims = {"num_features": data.num_features, "num_classes": data.num_classes}
    model = {"kind": "mlp", "hidden": [32]}
    trainers = {c: make_trainer(model, data.train[c], None, **dims, seed=seed) for c in ids}
    server = make_trainer(model, None, data.test, **dims, seed=seed)
    weights = server.initial_weights(init_seed(seed))
    rng = random.Random(drop_seed)
    for rnd in range(1, rounds + 1):
        updates = {}
        for cid in ids:
            if (rnd >= 2 and cid in crashed) or rng.random() < dropout:
                continue
            cfg = FitConfig(epochs=1, batch_size=16, lr=0.05, seed=fit_seed(seed, rnd, cid))
            result = trainers[cid].fit(weights, cfg)
            updates[cid] = (result.weights, result.num_examples)
        weights = ref.fedavg(updates)
    return server.evaluate(weights).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    clean = run(args.seed, 0.0, frozenset(), 0, args.rounds)
    print(f"fault-free: {clean:.4f}")
    faulty = [run(args.seed, 0.3, CRASHED, d, args.rounds) for d in range(args.draws)]
    for d, acc in enumerate(faulty):
        print(f"faults, draw {d}: {acc:.4f} ({100 * (acc - clean):+.1f} points)")
    mean = sum(faulty) / len(faulty)
    print(f"faults, mean of {len(faulty)}: {mean:.4f} ({100 * (mean - clean):+.1f} points)")


if __name__ == "__main__":
    main()

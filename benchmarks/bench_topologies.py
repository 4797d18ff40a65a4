"""Issue 4's targets, measured: hierarchical and gossip against the centralized reference.

One run of each, over the in-process bus (``broker: memory``; the traffic
counts are the same encoded bytes a broker would carry), digits with a
Dirichlet(0.5) partition and an MLP:

- hierarchical: 2 edges x 10 devices, ``edge_rounds`` local rounds per global
  round, against centralized FedAvg on the same 20-client partition after the
  same number of device-level epochs (global rounds x edge_rounds rounds of
  1 epoch); target: within 2 points.
- traffic: the cloud's bytes per global round (up + down, on its own
  connection) against the centralized server's bytes per round; target: at
  most 1.2 x (edges + 1) / (devices + 1).
- gossip: 16 peers on a random 3-regular graph (Metropolis mixing) on a
  16-client partition, ``rounds`` training rounds then ``final_mixing_rounds``
  mixing-only rounds (the consensus phase; no training, so the same number
  of epochs), against centralized FedAvg with 16 clients and the same
  training rounds; targets: mean accuracy within 3 points, best - worst peer at
  most 3 points at the end, consensus distance at the last round below round 1.
- faults: edge-a killed at the middle global round (devices re-home to the
  cloud), and 20% churn (each peer leaves with probability 0.2 per round, for
  one round) in gossip; targets: the runs complete and the targets above hold
  within 2 more points. ``--churn-seeds`` repeats the churn run with other
  churn draws (same partition and initial model) and prints every run.

Usage: ``python benchmarks/bench_topologies.py [--rounds-hier N] [--rounds-gossip N]
[--final-mixing N] [--lr-decay X] [--only-gossip] [--churn-seeds 0,1,2,3,4]``.
Prints every figure with its verdict; exit status 0 whatever the verdicts (it
measures, it does not gate).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from fedbus.launch.federation import run_federation
from fedbus.launch.gossip import run_gossip
from fedbus.launch.hierarchical import run_hierarchical
from fedbus.nodes import ServerObserver
from fedbus.topology import Topology, loads_topology

COMMON = """
seed: {seed}
broker: memory
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: 0.5}}}}
model: {{kind: mlp, hidden: [32]}}
training: {{epochs: 1, batch_size: {batch}, lr: {lr}}}
"""


def centralized(clients: int, rounds: int, *, seed: int, batch: int, lr: float) -> Topology:
    """Centralized FedAvg, every client every round."""
    return loads_topology(
        f"name: ref{clients}\n"
        + COMMON.format(seed=seed, batch=batch, lr=lr)
        + f"protocol: {{kind: centralized, rounds: {rounds}, round_timeout_s: 60}}\n"
        f"nodes: {{server: {{id: server}}, clients: {{count: {clients}}}}}\n"
    )


def hierarchical(
    rounds: int, edge_rounds: int, *, seed: int, batch: int, lr: float, faults: str = ""
) -> Topology:
    """Cloud over 2 edges x 10 devices."""
    return loads_topology(
        "name: hier\n"
        + COMMON.format(seed=seed, batch=batch, lr=lr)
        + f"protocol: {{kind: hierarchical, rounds: {rounds}, edge_rounds: {edge_rounds}, "
        "rehome: parent, round_timeout_s: 60}\n"
        "nodes:\n  server: {id: cloud}\n  edges:\n"
        "    - {id: edge-a, clients: 10}\n    - {id: edge-b, clients: 10}\n" + faults
    )


def gossip(
    rounds: int,
    *,
    seed: int,
    batch: int,
    lr: float,
    final: int = 0,
    decay: float = 1.0,
    faults: str = "",
) -> Topology:
    """16 peers, random 3-regular graph, Metropolis mixing, then ``final`` mixing-only rounds."""
    return loads_topology(
        "name: gossip\n"
        + COMMON.format(seed=seed, batch=batch, lr=lr)
        + f"protocol: {{kind: gossip, rounds: {rounds}, mixing: metropolis, round_timeout_s: 5, "
        f"final_mixing_rounds: {final}, lr_decay: {decay}}}\n"
        "nodes: {peers: {count: 16}, graph: {kind: random_regular, degree: 3}}\n" + faults
    )


class _Rows(ServerObserver):
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_round(self, row: Any) -> None:
        self.rows.append(dict(row))


async def _centralized_rows(topology: Topology) -> list[dict[str, Any]]:
    rows = _Rows()
    result = await run_federation(topology, out=None, observer=rows)
    assert result.server.success, result.server.reason
    return rows.rows


def _bytes_per_round(rows: list[dict[str, Any]]) -> float:
    return sum(r["bytes_up"] + r["bytes_down"] for r in rows) / max(len(rows), 1)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


async def main(args: argparse.Namespace) -> None:
    seed, batch, lr = args.seed, args.batch_size, args.lr
    gr, fm, decay = args.rounds_gossip, args.final_mixing, args.lr_decay
    print(f"digits, Dirichlet(0.5), MLP [32], epochs 1, batch {batch}, lr {lr}, seed {seed}\n")
    t0 = time.monotonic()
    if not args.only_gossip:
        await _hierarchical(args)
    seeds = [int(x) for x in args.churn_seeds.split(",")] if args.churn_seeds else [seed]
    await _gossip(gr, fm, decay, seed=seed, batch=batch, lr=lr, churn_seeds=seeds)
    print(f"\nwall {time.monotonic() - t0:.1f} s")


async def _hierarchical(args: argparse.Namespace) -> None:
    seed, batch, lr = args.seed, args.batch_size, args.lr
    hr, er = args.rounds_hier, args.edge_rounds

    # --- hierarchical vs centralized on the same 20-client partition ---------------
    ref20 = await _centralized_rows(centralized(20, hr * er, seed=seed, batch=batch, lr=lr))
    rows = _Rows()
    hier = await run_hierarchical(
        hierarchical(hr, er, seed=seed, batch=batch, lr=lr), out=None, observer=rows
    )
    assert hier.server.success, hier.server.reason
    h_acc, c_acc = rows.rows[-1]["accuracy"], ref20[-1]["accuracy"]
    print(f"hierarchical: {hr} global rounds x {er} edge rounds = {hr * er} device epochs")
    print(
        f"  ours {h_acc:.4f}  centralized ({hr * er} rounds, 20 clients) {c_acc:.4f}  "
        f"gap {100 * (c_acc - h_acc):+.2f} pts  target <= 2: {_verdict(c_acc - h_acc <= 0.02)}"
    )
    cloud, server = _bytes_per_round(rows.rows), _bytes_per_round(ref20)
    bound = 1.2 * (2 + 1) / (20 + 1)
    print(
        f"traffic: cloud {cloud / 1e3:.1f} kB/global round, centralized server {server / 1e3:.1f} kB/round, "
        f"ratio {cloud / server:.3f}  target <= {bound:.3f}: {_verdict(cloud / server <= bound)}"
    )

    # --- edge killed mid-run -------------------------------------------------------------
    crash = f"faults: [{{kind: crash, nodes: [edge-a], at_round: {max(2, hr // 2)}}}]\n"
    rows_f = _Rows()
    hier_f = await run_hierarchical(
        hierarchical(hr, er, seed=seed, batch=batch, lr=lr, faults=crash), out=None, observer=rows_f
    )
    f_acc = rows_f.rows[-1]["accuracy"] if rows_f.rows else float("nan")
    rehomed = sorted(
        {n.parents[-1] for d, n in hier_f.device_nodes.items() if d.startswith("edge-a-")}
    )
    print(
        f"hierarchical, edge-a killed at round {max(2, hr // 2)}: completed {hier_f.server.success} "
        f"({len(rows_f.rows)} rounds), devices re-homed to {rehomed}, accuracy {f_acc:.4f}, "
        f"gap {100 * (c_acc - f_acc):+.2f} pts  target <= 4: "
        f"{_verdict(hier_f.server.success and c_acc - f_acc <= 0.04)}"
    )


async def _gossip(
    gr: int, fm: int, decay: float, *, seed: int, batch: int, lr: float, churn_seeds: list[int]
) -> None:
    # --- gossip vs centralized on the same 16-client partition --------------------------
    ref16 = await _centralized_rows(centralized(16, gr, seed=seed, batch=batch, lr=lr))
    g = await run_gossip(gossip(gr, seed=seed, batch=batch, lr=lr, final=fm, decay=decay), out=None)
    assert g.success, g.reason
    last, first = g.rows[-1], g.rows[0]
    c16 = ref16[-1]["accuracy"]
    spread = last["accuracy_max"] - last["accuracy_min"]
    trained = g.rows[gr - 1]
    print(
        f"\ngossip: 16 peers, random 3-regular, {gr} training rounds + {fm} mixing-only rounds, "
        f"lr_decay {decay}"
    )
    print(
        f"  after the training rounds (round {gr}): mean {trained['accuracy']:.4f}, spread "
        f"{100 * (trained['accuracy_max'] - trained['accuracy_min']):.2f} pts, consensus distance "
        f"{trained['consensus_distance']:.4f}"
    )
    print(
        f"  mean {last['accuracy']:.4f} (min {last['accuracy_min']:.4f}, max {last['accuracy_max']:.4f})  "
        f"centralized ({gr} rounds, 16 clients) {c16:.4f}  gap {100 * (c16 - last['accuracy']):+.2f} pts  "
        f"target <= 3: {_verdict(c16 - last['accuracy'] <= 0.03)}"
    )
    print(f"  spread {100 * spread:.2f} pts  target <= 3: {_verdict(spread <= 0.03)}")
    print(
        f"  consensus distance round 1 {first['consensus_distance']:.4f}, last {last['consensus_distance']:.4f}"
        f"  target last < first: {_verdict(last['consensus_distance'] < first['consensus_distance'])}"
    )

    churn = "faults: [{kind: churn, probability: 0.2, down_rounds: 1}]\n"
    topo = gossip(gr, seed=seed, batch=batch, lr=lr, final=fm, decay=decay, faults=churn)
    passed = 0
    for fault_seed in churn_seeds:
        gc = await run_gossip(topo, out=None, fault_seed=fault_seed)
        lc = gc.rows[-1] if gc.rows else {}
        away = sum(r["dropped"] for r in gc.rows) / max(len(gc.rows), 1)
        gap_c = c16 - lc.get("accuracy", float("nan"))
        spread_c = lc.get("accuracy_max", 1.0) - lc.get("accuracy_min", 0.0)
        cd_ok = lc.get("consensus_distance", 1e9) < first_cd(gc.rows)
        ok = gc.success and gap_c <= 0.05 and spread_c <= 0.05 and cd_ok
        passed += ok
        wall = lc.get("elapsed_s", float("nan"))
        print(
            f"gossip with 20% churn, churn seed {fault_seed}: completed {gc.success} "
            f"({len(gc.rows)} rounds, {wall:.1f} s, {away:.1f} peers away per round on average), "
            f"mean {lc.get('accuracy', float('nan')):.4f}, gap {100 * gap_c:+.2f} pts "
            f"(target <= 5), spread {100 * spread_c:.2f} pts (target <= 5), consensus "
            f"{first_cd(gc.rows):.4f} -> {lc.get('consensus_distance', float('nan')):.4f} "
            f"(target last < first): {_verdict(ok)}"
        )
    print(f"gossip with 20% churn: {passed} of {len(churn_seeds)} runs pass every target")


def first_cd(rows: list[dict[str, Any]]) -> float:
    """Consensus distance of the first row (nan without rows)."""
    return float(rows[0]["consensus_distance"]) if rows else float("nan")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds-hier", type=int, default=15, help="global rounds (hierarchical)")
    parser.add_argument("--edge-rounds", type=int, default=2)
    parser.add_argument("--rounds-gossip", type=int, default=60, help="training rounds (gossip)")
    parser.add_argument(
        "--final-mixing", type=int, default=10, help="mixing-only rounds after them (gossip)"
    )
    parser.add_argument("--lr-decay", type=float, default=1.0, help="per-round lr decay (gossip)")
    parser.add_argument("--only-gossip", action="store_true", help="skip the hierarchical runs")
    parser.add_argument(
        "--churn-seeds",
        default="",
        help="comma-separated seeds of the churn draws, one gossip churn run each "
        "(same data and initial model; default: the run's --seed)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(main(parser.parse_args()))

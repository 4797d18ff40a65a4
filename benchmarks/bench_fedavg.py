"""Issue 3's targets for centralized FL, fedbus beside the reference loop of the same run.

The reference is `reference_fedavg.run_reference`: one process, no bus, a
serial loop over the selected clients with the same trainer code and the
same weighted average (fedbus over ``broker: memory`` ends within 1e-6 of
it: tests/nodes/test_federation_memory.py). fedbus runs as a user runs it,
``python -m fedbus run TOPOLOGY`` in a subprocess (`_fedavg_runs.run_fedbus`).
Subcommands::

    .venv/bin/python benchmarks/bench_fedavg.py accuracy             # digits + Synthetic, 3 seeds
    .venv/bin/python benchmarks/bench_fedavg.py accuracy --seeds 0   # one seed (faster)
    .venv/bin/python benchmarks/bench_fedavg.py overhead             # 1,000 clients, 3 interleaved runs
    .venv/bin/python benchmarks/bench_fedavg.py overhead --quick     # 200 clients, 1 run
    .venv/bin/python benchmarks/bench_fedavg.py overhead --variants memory,lean   # only these
    .venv/bin/python benchmarks/bench_fedavg.py startup              # quickstart: start to round 1
    .venv/bin/python benchmarks/bench_fedavg.py faults               # 30 rounds, ~3 min
    .venv/bin/python benchmarks/bench_fedavg.py faults --aggregator mifa   # + MIFA, ~3 min more

* ``accuracy``: digits, 20 clients, Dirichlet(0.5), MLP 64-32-10, all
  clients per round, E=1, B=16, lr 0.05, 30 rounds through the embedded
  mosquitto: final accuracy >= 0.85. Synthetic(1,1), 10 of 30 clients per
  round, E=20, B=10, lr 0.01, 200 rounds over ``broker: memory`` (the same
  nodes, no broker; 200 rounds through mosquitto take no other path):
  FedAvg 0.80-0.90 per seed, and FedProx (mu=1) above FedAvg in the mean.
* ``overhead``: 1,000 clients, Synthetic(0,0) with 20 samples each, logistic
  regression, all clients per round, E=1, B=10, lr 0.01. Runs interleave
  (reference, mosquitto with the lean client, the paho client, the lean client
  with the clients in two worker processes (``--workers 2``), memory)
  ``--runs`` times; the lean client is what `fedbus run` uses with its
  embedded broker (``broker.client``). Per-round wall time: the
  median of ``wall_s`` over rounds 2.. of each run (round 1 pays the first,
  threaded fits), then the median over runs; the reference's is its median
  round (training + aggregation). Targets: mosquitto within 3x, memory
  within 1.5x. The mosquitto runs use a broker started here with
  ``sys_interval 1``, whose ``$SYS/broker/messages/received|sent`` are read
  before and after each run; every client is its own MQTT connection. A last
  run with the embedded broker measures what a user sees: time from process
  start to the end of round 1 (< 3 s) and the peak resident memory of the
  whole process tree, broker included (< 400 MB).
* ``startup``: the same start-to-round-1 time for examples/quickstart.yaml.
* ``faults``: digits, 20 clients all selected, min_clients 8,
  round_timeout_s 5, dropout 0.3, 3 clients crashed at round 2, against the
  same run without faults (same seed, same rounds), both through mosquitto:
  every faulty round closes at its deadline with the rest, and the final
  accuracy stays within 2 points. ``--aggregator SPEC`` (repeatable) adds
  the faulty run and the fault-free run with that ``protocol.aggregator``
  (e.g. ``mifa``), judged against the fault-free FedAvg run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_fedavg as ref
from _fedavg_runs import DIGITS, FAULTS, OVERHEAD, ROOT, SYNTHETIC, RunResult, SysBroker, run_fedbus


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _check(result: RunResult, what: str) -> RunResult:
    if result.rc != 0:
        raise SystemExit(f"{what}: fedbus run exited {result.rc}:\n{result.log[-3000:]}")
    return result


def _table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(flush=True)


# -- accuracy ----------------------------------------------------------------------------


def accuracy(args: argparse.Namespace, work: Path) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    print("## accuracy: digits, 20 clients, Dirichlet(0.5), MLP 64-32-10, 30 rounds\n", flush=True)
    digits = run_fedbus(
        DIGITS.format(name="bench-digits", seed=0, broker="embedded", rounds=30,
                      min_clients=20, round_timeout_s=60, faults=""),
        work / "digits",
    )  # fmt: skip
    _check(digits, "digits")
    _, history = ref.run_reference(**ref.PRESETS["digits"], seed=0)
    ours, theirs = digits.final_accuracy, history[-1]["accuracy"]
    _table(
        ["run", "fedbus (mosquitto)", "reference loop", "target", "verdict"],
        [["digits, seed 0, 30 rounds", f"{ours:.4f}", f"{theirs:.4f}", ">= 0.85",
          _verdict(ours >= 0.85)]],
    )  # fmt: skip
    print(
        f"## accuracy: Synthetic(1,1), 10 of 30 per round, E=20, 200 rounds, "
        f"broker: memory, seeds {seeds}\n",
        flush=True,
    )
    rows, finals = [], {0.0: [], 1.0: []}  # type: ignore[var-annotated]
    for seed in seeds:
        for mu in (0.0, 1.0):
            result = run_fedbus(
                SYNTHETIC.format(name=f"bench-syn-{seed}-{int(mu)}", seed=seed, broker="memory",
                                 rounds=args.synthetic_rounds, mu=mu),
                work / f"syn-{seed}-{mu}",
            )  # fmt: skip
            _check(result, f"synthetic seed {seed} mu {mu}")
            _, hist = ref.run_reference(
                **{**ref.PRESETS["synthetic"], "rounds": args.synthetic_rounds}, seed=seed, mu=mu
            )
            acc = result.final_accuracy
            finals[mu].append(acc)
            target = "0.80-0.90" if mu == 0 else "-"
            ok = _verdict(0.80 <= acc <= 0.90) if mu == 0 else "-"
            name = "FedAvg" if mu == 0 else "FedProx mu=1"
            rows.append([f"{name}, seed {seed}", f"{acc:.4f}", f"{hist[-1]['accuracy']:.4f}",
                         target, ok])  # fmt: skip
            print(f"  {name} seed {seed}: fedbus {acc:.4f}, reference {hist[-1]['accuracy']:.4f}",
                  flush=True)  # fmt: skip
    avg, prox = statistics.mean(finals[0.0]), statistics.mean(finals[1.0])
    rows.append(["mean FedAvg / FedProx", f"{avg:.4f} / {prox:.4f}", "", "FedProx > FedAvg",
                 _verdict(prox > avg) + ("" if len(seeds) >= 3 else f" ({len(seeds)} seed(s))")])  # fmt: skip
    print()
    _table(["run", "fedbus (memory)", "reference loop", "target", "verdict"], rows)


# -- overhead ----------------------------------------------------------------------------


def _reference_round(clients: int, rounds: int) -> float:
    cfg = {**ref.PRESETS["overhead"], "num_clients": clients, "clients_per_round": clients,
           "rounds": rounds}  # fmt: skip
    _, history = ref.run_reference(**cfg, seed=0)
    return _med([r["wall_s"] for r in history])


OVERHEAD_VARIANTS: Final = ("lean", "paho", "workers", "memory", "embedded")
"""``--variants``: what `overhead` runs (the reference loop always runs)."""


def overhead(args: argparse.Namespace, work: Path) -> None:
    clients, rounds = args.clients, args.rounds
    chosen = set(args.variants.split(","))
    if unknown := chosen - set(OVERHEAD_VARIANTS):
        raise SystemExit(f"unknown --variants {sorted(unknown)}; choose from {OVERHEAD_VARIANTS}")
    print(f"## overhead: {clients} clients, Synthetic(0,0) x 20 samples, logreg, all per round, "
          f"{rounds} rounds, {args.runs} interleaved run(s), variants {args.variants}\n",
          flush=True)  # fmt: skip
    broker = SysBroker() if chosen & {"lean", "paho", "workers"} else None
    if broker is not None:
        print(f"broker for the counted runs: {broker.url}, open files limit "
              f"{broker.open_files_limit()}", flush=True)  # fmt: skip
    refs: list[float] = []
    walls: dict[str, list[float]] = {name: [] for name in OVERHEAD_VARIANTS}
    counts: list[dict[str, int]] = []
    peaks: list[float] = []

    def measure(name: str, broker_yaml: str, i: int, what: str, *extra: str) -> RunResult:
        pids = (broker.proc.pid,) if broker is not None and broker_yaml != "memory" else ()
        result = _check(
            run_fedbus(OVERHEAD.format(name="bench-oh", broker=broker_yaml, rounds=rounds,
                                       clients=clients), work / f"oh-{name}-{i}", args=extra,
                       extra_pids=pids),
            what,
        )  # fmt: skip
        walls[name].append(_med(result.round_walls(skip_first=True)))
        return result

    try:
        for i in range(args.runs):
            refs.append(_reference_round(clients, rounds))
            line = f"  run {i + 1}: reference {refs[-1]:.3f} s"
            if broker is not None:
                # The lean client (the embedded broker's default), then paho (a URL's default).
                lean_broker = f"{{url: '{broker.url}', client: lean}}"
            if "lean" in chosen and broker is not None:
                before = broker.counters(2.5)
                r = measure("lean", lean_broker, i, "overhead mosquitto (lean client)")
                after = broker.counters(2.5)
                counts.append({k: after[k] - before.get(k, 0) for k in after})
                peaks.append(r.peak_rss_mb)
                line += (f", mosquitto {walls['lean'][-1]:.3f} s (peak {r.peak_rss_mb:.0f} MB "
                         f"with the broker; broker messages {counts[-1]})")  # fmt: skip
            if "paho" in chosen and broker is not None:
                measure("paho", broker.url, i, "overhead mosquitto (paho client)")
                line += f", paho client {walls['paho'][-1]:.3f} s"
            if "workers" in chosen and broker is not None:
                measure("workers", lean_broker, i,
                        "overhead mosquitto (lean client, 2 worker processes)", "--workers", "2")  # fmt: skip
                line += f", lean with --workers 2 {walls['workers'][-1]:.3f} s"
            if "memory" in chosen:
                measure("memory", "memory", i, "overhead memory")
                line += f", memory {walls['memory'][-1]:.3f} s"
            print(line, flush=True)
    finally:
        if broker is not None:
            broker.close()
    r_ref = _med(refs)
    print(
        f"\nper-round wall time, s (median of {args.runs}; rounds 2..{rounds} of each fedbus run):\n"
    )
    labels = {
        "lean": ("through mosquitto (lean client)", "<= 3x", 3.0),
        "paho": ("  same, paho client (MQTT 5)", "", 0.0),
        "workers": ("  same, lean client, clients in 2 worker processes (--workers 2)", "<= 3x",
                    3.0),
        "memory": ("broker: memory", "<= 1.5x", 1.5),
    }  # fmt: skip
    rows = []
    for name, (label, target, bound) in labels.items():
        if walls[name]:
            w = _med(walls[name])
            verdict = _verdict(w <= bound * r_ref) if bound else ""
            rows.append([label, f"{w:.3f}", f"{r_ref:.3f}", f"{w / r_ref:.2f}x", target, verdict])
    _table(["", "fedbus", "reference loop", "ratio", "target", "verdict"], rows)
    for name, values in walls.items():
        if values:
            print(f"  {name}: " + " / ".join(f"{v:.3f}" for v in values) + " s; reference "
                  + " / ".join(f"{v:.3f}" for v in refs) + " s")  # fmt: skip
    if counts:
        c = counts[len(counts) // 2]
        print(f"\nbroker counters for one run ({clients} clients, {rounds} rounds, connects and "
              f"joins included): PUBLISH received {c.get('publish_received', 0):,}, sent "
              f"{c.get('publish_sent', 0):,}; MQTT packets of all types received "
              f"{c.get('messages_received', 0):,}, sent {c.get('messages_sent', 0):,}\n")  # fmt: skip
    if "embedded" in chosen:
        _overhead_embedded(args, work, r_ref, peaks)


def _overhead_embedded(
    args: argparse.Namespace, work: Path, r_ref: float, peaks: list[float]
) -> None:
    """What a user sees with the embedded broker: start to round 1, peak memory."""
    clients, rounds = args.clients, args.rounds
    embedded = _check(
        run_fedbus(OVERHEAD.format(name="bench-oh", broker="embedded", rounds=rounds,
                                   clients=clients), work / "oh-embedded"),
        "overhead embedded",
    )  # fmt: skip
    mem_first = _check(
        run_fedbus(OVERHEAD.format(name="bench-oh", broker="memory", rounds=2, clients=clients),
                   work / "oh-mem-first"),
        "overhead memory startup",
    )  # fmt: skip
    first, peak = embedded.first_round_s, embedded.peak_rss_mb
    _table(
        ["fedbus run, embedded broker", "measured", "Flower 1.42", "target", "verdict"],
        [
            ["process start to end of round 1, s", f"{first:.2f}" if first else "?", "19",
             "< 3", _verdict(first is not None and first < 3)],
            ["  same over broker: memory, s",
             f"{mem_first.first_round_s:.2f}" if mem_first.first_round_s else "?", "", "", ""],
            ["peak RSS of the process tree (broker included), MB", f"{peak:.0f}", "830", "< 400",
             _verdict(peak < 400)],
            ["  same through the counted broker (max over runs), MB",
             f"{max(peaks):.0f}" if peaks else "-", "", "", ""],
        ],
    )  # fmt: skip
    print(
        f"embedded run (lean client): per-round "
        f"{_med(embedded.round_walls(skip_first=True)):.3f} s "
        f"({_med(embedded.round_walls(skip_first=True)) / r_ref:.2f}x the reference), "
        f"round 1 {embedded.rows[0]['wall_s']:.3f} s, elapsed at round 1 (server clock) "
        f"{embedded.rows[0]['elapsed_s']:.2f} s, whole process {embedded.wall_s:.1f} s"
    )


def startup(args: argparse.Namespace, work: Path) -> None:
    text = (ROOT / "examples" / "quickstart.yaml").read_text()
    firsts, peaks = [], []
    for i in range(args.runs):
        r = _check(run_fedbus(text, work / f"qs-{i}", args=("--rounds", "3")), "quickstart")
        firsts.append(r.first_round_s or float("nan"))
        peaks.append(r.peak_rss_mb)
    f = _med(firsts)
    _table(
        ["quickstart (10 clients, embedded broker)", "measured", "target", "verdict"],
        [[f"process start to end of round 1, s (median of {args.runs})", f"{f:.2f}", "< 3",
          _verdict(f < 3)],
         ["peak RSS of the process tree, MB", f"{max(peaks):.0f}", "-", "-"]],
    )  # fmt: skip


# -- faults --------------------------------------------------------------------------------


def _with_aggregator(text: str, spec: str) -> str:
    """The DIGITS topology with ``protocol.aggregator: SPEC`` (YAML text) added."""
    return text.replace("  kind: centralized\n", f"  kind: centralized\n  aggregator: {spec}\n", 1)


def _deadlines(result: RunResult, rounds: int) -> tuple[bool, str]:
    """Whether every faulty round closed at its deadline with >= 8 updates, and a summary."""
    rows = result.rows
    at_deadline = [r for r in rows if r["dropped"] > 0]
    deadline_ok = all(4.9 <= r["wall_s"] <= 6.5 for r in at_deadline)
    quorum_ok = all(r["participants"] >= 8 for r in rows) and len(rows) == rounds
    parts = [r["participants"] for r in rows] or [0]
    walls = [r["wall_s"] for r in at_deadline] or [float("nan")]
    line = (f"{len(rows)} rounds, participants min {min(parts)} median "
            f"{_med([float(p) for p in parts]):.0f} max {max(parts)}; rounds with drops "
            f"{len(at_deadline)}, their wall_s {min(walls):.2f}-{max(walls):.2f} s; attempts > 1: "
            f"{sum(r['attempt'] > 1 for r in rows)}")  # fmt: skip
    return deadline_ok and quorum_ok, line


def faults(args: argparse.Namespace, work: Path) -> None:
    rounds = args.fault_rounds
    print(f"## faults: digits, 20 clients all selected, min_clients 8, round_timeout_s 5, "
          f"{rounds} rounds, embedded broker\n", flush=True)  # fmt: skip
    common = dict(seed=0, broker="embedded", rounds=rounds, min_clients=8, round_timeout_s=5)
    clean = _check(run_fedbus(DIGITS.format(name="bench-clean", faults="", **common),
                              work / "clean"), "fault-free")  # fmt: skip
    faulty = _check(run_fedbus(DIGITS.format(name="bench-faults", faults=FAULTS, **common),
                               work / "faulty"), "faults")  # fmt: skip
    rows = faulty.rows
    faulty_ok, line = _deadlines(faulty, rounds)
    diff = faulty.final_accuracy - clean.final_accuracy
    print(f"faulty run: {line}\n")
    _table(
        ["", "with faults", "fault-free", "difference", "target", "verdict"],
        [
            ["final accuracy", f"{faulty.final_accuracy:.4f}", f"{clean.final_accuracy:.4f}",
             f"{diff * 100:+.2f} points", "within 2 points", _verdict(abs(diff) <= 0.02)],
            ["rounds closed at the deadline with >= 8",
             f"{sum(r['dropped'] > 0 for r in rows)} of {len(rows)}", "", "", "every round",
             _verdict(faulty_ok)],
            ["run time, s", f"{faulty.wall_s:.1f}", f"{clean.wall_s:.1f}", "", "", ""],
        ],
    )  # fmt: skip
    # The same faults with other aggregators (--aggregator); fault-free FedAvg stays the yardstick.
    table = []
    for i, spec in enumerate(args.aggregator or []):
        alone = _check(run_fedbus(_with_aggregator(DIGITS.format(name=f"bench-clean-agg{i}",
                                                                 faults="", **common), spec),
                                  work / f"clean-agg{i}"), f"fault-free, {spec}")  # fmt: skip
        hit = _check(run_fedbus(_with_aggregator(DIGITS.format(name=f"bench-faults-agg{i}",
                                                               faults=FAULTS, **common), spec),
                                work / f"faulty-agg{i}"), f"faults, {spec}")  # fmt: skip
        ok, line = _deadlines(hit, rounds)
        print(f"faulty run, aggregator {spec}: {line}", flush=True)
        vs_fedavg = hit.final_accuracy - clean.final_accuracy
        vs_own = hit.final_accuracy - alone.final_accuracy
        table.append([f"`{spec}`", f"{hit.final_accuracy:.4f}", f"{vs_fedavg * 100:+.2f} points",
                      _verdict(vs_fedavg >= -0.02), f"{alone.final_accuracy:.4f}",
                      f"{vs_own * 100:+.2f} points", _verdict(ok)])  # fmt: skip
    if table:
        print()
        _table(
            ["aggregator", "with faults", "vs fault-free FedAvg", "at most 2 points below",
             "same aggregator fault-free", "cost of the faults", "every round at its deadline"],
            [["`fedavg`", f"{faulty.final_accuracy:.4f}", f"{diff * 100:+.2f} points",
              _verdict(diff >= -0.02), f"{clean.final_accuracy:.4f}", f"{diff * 100:+.2f} points",
              _verdict(faulty_ok)], *table],
        )  # fmt: skip


COMMANDS: dict[str, Callable[[argparse.Namespace, Path], None]] = {
    "accuracy": accuracy,
    "overhead": overhead,
    "startup": startup,
    "faults": faults,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=[*COMMANDS, "all"])
    parser.add_argument("--seeds", default="0,1,2", help="Synthetic seeds (accuracy)")
    parser.add_argument("--synthetic-rounds", type=int, default=200)
    parser.add_argument("--clients", type=int, default=1000, help="overhead clients")
    parser.add_argument("--rounds", type=int, default=6, help="overhead rounds per run")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs (overhead, startup)")
    parser.add_argument("--fault-rounds", type=int, default=30)
    parser.add_argument(
        "--aggregator", action="append", metavar="SPEC",
        help="faults: also run this protocol.aggregator (YAML, e.g. mifa or "
        "'{kind: mifa, server_lr: 1.5}') with and without the faults; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--variants", default=",".join(OVERHEAD_VARIANTS),
        help=f"overhead: comma-separated subset of {','.join(OVERHEAD_VARIANTS)} (default all)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="overhead: 200 clients, 1 run")
    parser.add_argument("--keep", metavar="DIR", help="keep run folders here")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.runs = 200, 1
    print(f"bench_fedavg {args.command}: {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n",
          flush=True)  # fmt: skip
    names = list(COMMANDS) if args.command == "all" else [args.command]
    with tempfile.TemporaryDirectory(prefix="bench-fedavg-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        for name in names:
            COMMANDS[name](args, work / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

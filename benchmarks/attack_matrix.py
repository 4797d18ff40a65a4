"""Attacks x defenses on digits: writes docs/robustness.md and docs/robustness.png.

One process, no bus (`fedbus.attacks.simulate`): 20 clients, Dirichlet(0.5),
an MLP with 32 hidden units, every client every round, 1 local epoch, 30
rounds. Each cell is the final test accuracy of one run; attackers are 20% of
the clients (4 of 20), chosen with the seed. The backdoor table runs model
replacement by one client (5%) in rounds 10, 20 and 30 (10% of rounds).

The *default robust configuration* is sample-weighted FedAvg behind the
validators of `fedbus.topology.DEFAULT_ROBUST_VALIDATORS`: ``norm_outlier``
and ``cosine_outlier`` (against the round's median delta) for model
poisoning, then the ``validation_accuracy`` gate (marginal contribution on a
validation set cut from the held-out split) for label flipping.

The script rewrites only the block between ``<!-- matrix:begin -->`` and
``<!-- matrix:end -->`` in docs/robustness.md; the hand-written text around it
stays. Usage::

    .venv/bin/python benchmarks/attack_matrix.py            # 30 rounds, seed 0
    .venv/bin/python benchmarks/attack_matrix.py --rounds 10 --out /tmp/x
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedbus.aggregation import make_aggregator, make_validators
from fedbus.attacks import make_attack
from fedbus.attacks.simulate import SimConfig, _data, simulate
from fedbus.topology.robustness import DEFAULT_ROBUST_VALIDATORS

VALIDATION_FRACTION = max(
    float(v.get("validation_fraction", 0.0)) for v in DEFAULT_ROBUST_VALIDATORS
)
"""Share of the held-out split that becomes the server's validation set, in every row.

The gate needs it; the other rows ignore it, but every row is scored on the
same remaining test split so that the columns compare.
"""

ROBUST_VALIDATORS: list[dict[str, Any]] = [
    {k: v for k, v in spec.items() if k != "validation_fraction"}
    for spec in DEFAULT_ROBUST_VALIDATORS
]
"""The default validators as `make_validators` takes them (the fraction is the SimConfig's)."""

STATS_VALIDATORS: list[Any] = [
    {"kind": "norm_outlier"},
    {"kind": "cosine_outlier", "reference": "median"},
]

DEFENSES: dict[str, tuple[Any, list[Any]]] = {
    "fedavg": ("fedavg", []),
    "median": ("median", []),
    "trimmed_mean(0.2)": ({"kind": "trimmed_mean", "beta": 0.2}, []),
    "multi_krum(f=4)": ({"kind": "multi_krum", "f": 4}, []),
    "bulyan(f=4)": ({"kind": "bulyan", "f": 4}, []),
    "geometric_median": ("geometric_median", []),
    "norm_clipping(2x median)": ("norm_clipping", []),
    "stats validators": ("fedavg", STATS_VALIDATORS),
    "default robust": ("fedavg", ROBUST_VALIDATORS),
}

ATTACKS: dict[str, Any] = {
    "clean": None,
    "sign_flip": "sign_flip",
    "gaussian": "gaussian",
    "alie": "alie",
    "ipm(0.1)": "ipm",
    "ipm(100)": {"kind": "ipm", "params": {"epsilon": 100.0}},
    "label_flip": "label_flip",
    "scaling": "scaling",
    "backdoor": "backdoor",
    "free_rider": "free_rider",
}

BACKDOOR = {"kind": "model_replacement", "fraction": 0.05, "params": {"epochs": 10}}
BACKDOOR_DEFENSES = ["fedavg", "norm_clipping(2x median)", "default robust"]

ALIE_Z = [None, 1.0, 2.0]
"""ALIE's z: Baruch et al.'s z_max(n, f) (0.385 for n=20, f=4), then larger shifts."""
ALIE_DEFENSES = ["fedavg", "median", "trimmed_mean(0.2)", "multi_krum(f=4)", "default robust"]

BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"


def _validators(specs: list[Any]) -> Any:
    """The simulation's validator factory; ``validation_accuracy`` gets the validation trainer."""
    if not specs:
        return None

    def build(trainer: Any) -> list[Any]:
        built = []
        for spec in specs:
            spec = dict(spec)
            if spec["kind"] == "validation_accuracy":
                spec["evaluate"] = trainer
            built.append(spec)
        return make_validators(built)

    return build


def run_one(defense: str, attack_spec: Any, cfg: SimConfig) -> tuple[float, float | None, int]:
    agg_spec, val_specs = DEFENSES[defense]
    attack = make_attack(attack_spec) if attack_spec is not None else None
    res = simulate(make_aggregator(agg_spec), attack, cfg, validators=_validators(val_specs))
    backdoor = res.backdoor_success[-1] if res.backdoor_success else None
    return res.final_accuracy, backdoor, sum(len(r) for r in res.rejected)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validation-fraction", type=float, default=VALIDATION_FRACTION)
    parser.add_argument("--out", default="docs", help="folder for robustness.md/.png")
    args = parser.parse_args(argv)
    cfg = SimConfig(
        num_clients=args.clients,
        rounds=args.rounds,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
    )
    started = time.perf_counter()
    table: dict[str, dict[str, float]] = {}
    for defense in DEFENSES:
        table[defense] = {}
        for name, spec in ATTACKS.items():
            acc, _, rejected = run_one(defense, spec, cfg)
            table[defense][name] = acc
            print(f"{defense:24s} {name:12s} {acc:.3f}  rejected {rejected}", flush=True)
    backdoor_rows = {}
    for defense in BACKDOOR_DEFENSES:
        acc, success, _ = run_one(defense, BACKDOOR, cfg)
        backdoor_rows[defense] = (acc, success or 0.0)
        print(f"{defense:24s} replacement  main {acc:.3f}  backdoor {success:.3f}", flush=True)
    alie_rows: dict[str, dict[str, float]] = {}
    for defense in ALIE_DEFENSES:
        alie_rows[defense] = {}
        for z in ALIE_Z:
            spec = "alie" if z is None else {"kind": "alie", "params": {"z": z}}
            acc, _, _ = run_one(defense, spec, cfg)
            alie_rows[defense][_z_label(z)] = acc
            print(f"{defense:24s} alie z={_z_label(z):8s} {acc:.3f}", flush=True)
    elapsed = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    block = render(table, backdoor_rows, alie_rows, cfg, elapsed, argv)
    write_block(out / "robustness.md", block)
    heatmap(table, out / "robustness.png")
    print(f"wrote {out / 'robustness.md'} and {out / 'robustness.png'} in {elapsed:.0f} s")
    return 0


def _z_label(z: float | None) -> str:
    return "z_max" if z is None else f"{z:g}"


def write_block(path: Path, block: str) -> None:
    """Replace the text between the matrix markers in ``path``; keep everything else.

    A file without markers gets a title and the block; a file with one marker
    but not the other is refused rather than half-overwritten.
    """
    text = path.read_text("utf-8") if path.exists() else ""
    generated = f"{BEGIN}\n{block.rstrip()}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + generated + tail
    elif BEGIN in text or END in text:
        raise SystemExit(f"{path}: one matrix marker without the other; fix the file by hand")
    else:
        text = "# Robustness: attacks x defenses on digits\n\n" + generated + "\n" + text
    path.write_text(text, "utf-8")


def render(
    table: dict[str, dict[str, float]],
    backdoor: dict[str, tuple[float, float]],
    alie_rows: Mapping[str, Mapping[str, float]],
    cfg: SimConfig,
    elapsed: float,
    argv: Sequence[str] | None,
) -> str:
    """The generated block of docs/robustness.md (tables, parameters, targets)."""
    clean = table["fedavg"]["clean"]
    cols = list(ATTACKS)
    cmd = " ".join(["python benchmarks/attack_matrix.py", *(argv or sys.argv[1:])])
    data, test, _ = _data(cfg)  # the simulation's own (cached) split, to print its sizes
    held_out = len(data.test)
    test_size = len(test)
    lines = [
        "<!-- Generated by benchmarks/attack_matrix.py; edits inside the markers are lost. -->",
        "",
        f"Command: `.venv/bin/{cmd.strip()}` ({elapsed:.0f} s on the CPU). "
        f"Setup: {cfg.num_clients} clients, Dirichlet({cfg.alpha}), MLP {list(cfg.hidden)}, "
        f"{cfg.rounds} rounds, all clients every round, {cfg.epochs} local epoch, batch "
        f"{cfg.batch_size}, lr {cfg.lr}, seed {cfg.seed}. The held-out split ({held_out} digits) "
        f"is cut in two: {held_out - test_size} form the server's validation set (used only by "
        f"`validation_accuracy`), and every cell is the final accuracy on the other "
        f"{test_size}. One seed: differences of 2 points (4 test digits) are noise.",
        "",
        "Attack parameters (effective, defaults unless stated):",
        "",
    ]
    for name, spec in ATTACKS.items():
        if spec is not None:
            lines.append(f"- {name}: `{make_attack(spec).describe()}`")
    lines.append(f"- model replacement: `{make_attack(BACKDOOR).describe()}`")
    lines += [
        "",
        "Rows: `stats validators` is FedAvg behind "
        f"`{_yaml(STATS_VALIDATORS)}`; `default robust` is FedAvg behind "
        f"`{_yaml(DEFAULT_ROBUST_VALIDATORS)}` (`fedbus.topology.robustness.DEFAULT_ROBUST_VALIDATORS`). "
        "The `backdoor` column is main-task accuracy under 20% backdoor-trigger poisoners.",
        "",
        "| aggregator | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for defense, row in table.items():
        lines.append(f"| {defense} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    lines += [
        "",
        "Model replacement (1 attacker, rounds 10/20/30, update scaled by n/eta):",
        "",
        "| aggregator | main accuracy | backdoor success |",
        "|---|---:|---:|",
    ]
    for defense, (acc, success) in backdoor.items():
        lines.append(f"| {defense} | {acc:.3f} | {success:.3f} |")
    zs = [_z_label(z) for z in ALIE_Z]
    lines += [
        "",
        "ALIE (20% attackers) against its own z: accuracy, and in brackets the change "
        "from that aggregator's clean accuracy:",
        "",
        "| aggregator | clean | " + " | ".join(f"z={z}" for z in zs) + " |",
        "|---|---:|" + "---:|" * len(zs),
    ]
    for defense, row in alie_rows.items():
        base = table[defense]["clean"]
        cells = " | ".join(f"{row[z]:.3f} ({row[z] - base:+.3f})" for z in zs)
        lines.append(f"| {defense} | {base:.3f} | {cells} |")
    robust = table["default robust"]
    attacked = [c for c in cols if c != "clean"]
    worst = min(attacked, key=lambda c: robust[c])
    misses = [c for c in attacked if robust[c] < clean - 0.05]
    clip_acc, clip_success = backdoor["norm_clipping(2x median)"]
    lines += [
        "",
        "Targets (issue 5), measured:",
        "",
        f"- Plain FedAvg loses >= 30 points (clean {clean:.3f}): sign_flip "
        f"{table['fedavg']['sign_flip'] - clean:+.3f}, gaussian "
        f"{table['fedavg']['gaussian'] - clean:+.3f}, alie {table['fedavg']['alie'] - clean:+.3f}.",
        f"- Default robust, no attack: {robust['clean']:.3f} vs FedAvg {clean:.3f} "
        f"(cost {clean - robust['clean']:+.3f}; target <= 0.030).",
        f"- Default robust, worst 20% attack: {worst} {robust[worst]:.4f} (target >= "
        f"{clean - 0.05:.4f}); below target: {', '.join(misses) if misses else 'none'}.",
        f"- Model replacement: FedAvg backdoor {backdoor['fedavg'][1]:.3f} (target > 0.8); "
        f"norm clipping {clip_success:.3f} (target < 0.2) with main task {clip_acc:.3f} vs "
        f"clean FedAvg {clean:.3f} ({clip_acc - clean:+.3f}; target within 0.02); default "
        f"robust {backdoor['default robust'][1]:.3f}, main task {backdoor['default robust'][0]:.3f}.",
    ]
    return "\n".join(lines)


def _yaml(specs: Sequence[Mapping[str, Any]]) -> str:
    items = ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in s.items()) + "}" for s in specs)
    return f"[{items}]"


def heatmap(table: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = list(table), list(ATTACKS)
    values = [[table[r][c] for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(12, 5.5))
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="final test accuracy")
    ax.set_title("digits, 20 clients, Dirichlet(0.5): 20% attackers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

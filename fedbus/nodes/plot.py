"""The results plot: accuracy and bytes per round (PNG, matplotlib's Agg backend).

matplotlib is an optional extra (``fedbus[plots]``, DESIGN.md 2a): a node
agent on a board must not need it. Without it the plot is skipped with one
warning per process, and every other result file is still written.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_plot"]

log = logging.getLogger(__name__)
_warned = False


def write_plot(path: Path, rows: Sequence[Mapping[str, Any]], *, title: str) -> bool:
    """Plot accuracy and bytes up/down per round into ``path``; False when skipped."""
    global _warned
    if importlib.util.find_spec("matplotlib") is None:
        if not _warned:
            _warned = True
            log.warning(
                "matplotlib is not installed: skipping the plot (pip install 'fedbus[plots]')"
            )
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    rounds = [int(r["round"]) for r in rows]
    accuracy = [float("nan") if r.get("accuracy") is None else r["accuracy"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    try:
        top.plot(rounds, accuracy, marker="o", markersize=3, label="accuracy")
        _levels(top, rows, rounds)
        top.set_ylabel("accuracy")
        top.set_title(title)
        top.grid(alpha=0.3)
        up = [r.get("bytes_up", 0) / 1e6 for r in rows]
        down = [r.get("bytes_down", 0) / 1e6 for r in rows]
        bottom.bar([x - 0.2 for x in rounds], up, width=0.4, label="up (received)")
        bottom.bar([x + 0.2 for x in rounds], down, width=0.4, label="down (sent)")
        bottom.set_ylabel("MB per round")
        bottom.set_xlabel("round")
        bottom.legend()
        bottom.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return True


def _levels(ax: Any, rows: Sequence[Mapping[str, Any]], rounds: list[int]) -> None:
    """Hierarchical: each edge's accuracy; gossip: the peers' min-max band and consensus distance."""
    edges = sorted({e for r in rows for e in (r.get("edge_accuracy") or {})})
    for edge in edges:
        values = [(r.get("edge_accuracy") or {}).get(edge, float("nan")) for r in rows]
        ax.plot(rounds, values, linestyle="--", linewidth=1, label=edge)
    if any("accuracy_min" in r for r in rows):
        low = [r.get("accuracy_min") or float("nan") for r in rows]
        high = [r.get("accuracy_max") or float("nan") for r in rows]
        ax.fill_between(rounds, low, high, alpha=0.2, label="peers min-max")
        twin = ax.twinx()
        distance = [r.get("consensus_distance") or float("nan") for r in rows]
        twin.plot(rounds, distance, color="tab:purple", linestyle=":", label="consensus distance")
        twin.set_ylabel("consensus distance")
        twin.legend(loc="lower right", fontsize=7)
    if edges or any("accuracy_min" in r for r in rows):
        ax.legend(loc="upper left", fontsize=7)

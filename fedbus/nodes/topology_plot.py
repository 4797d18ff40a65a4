"""A picture of the topology (``topology.png``): the cloud/edge/device tree, or the gossip graph.

Drawn with matplotlib's Agg backend and a simple deterministic layout (no
graph library): a hierarchy as a tree, leaves spread evenly and every
aggregator centred over its children; a gossip graph with the peers on a
circle (ring order, so rings and small worlds read as such). Like the
results plot it is skipped, with one warning, without matplotlib; a
centralized topology is a one-level tree (server over its clients).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Final

from fedbus.topology import NodeRole, Topology

__all__ = ["TOPOLOGY_PLOT_FILE", "tree_layout", "write_topology_plot"]

log = logging.getLogger(__name__)

TOPOLOGY_PLOT_FILE: Final = "topology.png"
_COLOURS = {NodeRole.SERVER: "tab:red", NodeRole.EDGE: "tab:orange", NodeRole.CLIENT: "tab:blue"}


def tree_layout(topology: Topology) -> dict[str, tuple[float, float]]:
    """Positions of a server-rooted topology: depth downwards, leaves evenly spaced."""
    infos = {i.id: i for i in topology.node_infos()}
    pos: dict[str, tuple[float, float]] = {}
    next_x = [0.0]

    def place(node: str) -> float:
        children = infos[node].children
        if not children:
            x = next_x[0]
            next_x[0] += 1.0
        else:
            xs = [place(c) for c in children]
            x = (min(xs) + max(xs)) / 2
        pos[node] = (x, -float(infos[node].depth))
        return x

    server = topology.nodes.server
    if server is not None:
        place(server)
    return pos


def write_topology_plot(path: Path, topology: Topology) -> bool:
    """Draw ``topology`` into ``path``; False when skipped (no matplotlib, nothing to draw)."""
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib is not installed: skipping the topology plot")
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    infos = {i.id: i for i in topology.node_infos()}
    if not infos:
        return False
    peers = topology.nodes.peers
    many = len(infos) > 40
    fig, ax = plt.subplots(figsize=(9, 6) if not peers else (7, 7))
    try:
        if peers:
            n = len(peers)
            pos = {
                p: (math.cos(2 * math.pi * i / n), math.sin(2 * math.pi * i / n))
                for i, p in enumerate(peers)
            }
            for a, neighbours in topology.adjacency().items():
                for b in neighbours:
                    if a < b:
                        (x0, y0), (x1, y1) = pos[a], pos[b]
                        ax.plot([x0, x1], [y0, y1], color="0.6", linewidth=0.8, zorder=1)
            colours = ["tab:green"] * n
            title = f"{topology.name}: {n} peers, {topology.protocol.mixing}"
        else:
            pos = tree_layout(topology)
            for node, info in infos.items():
                if info.parent is not None and node in pos and info.parent in pos:
                    (x0, y0), (x1, y1) = pos[info.parent], pos[node]
                    ax.plot([x0, x1], [y0, y1], color="0.6", linewidth=0.8, zorder=1)
            colours = [_COLOURS.get(infos[node].role, "tab:gray") for node in pos]
            title = f"{topology.name}: {topology.protocol.kind}"
        xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
        ax.scatter(xs, ys, c=colours, s=60 if many else 200, zorder=2, edgecolors="black")
        for node, (x, y) in pos.items():
            info = infos[node]
            if not many or info.role is not NodeRole.CLIENT:
                label = node if not info.external else f"{node} (external)"
                leaf = info.role is NodeRole.CLIENT
                ax.annotate(label, (x, y), textcoords="offset points",
                            xytext=(0, -9) if leaf else (0, 9), ha="center",
                            va="top" if leaf else "bottom", rotation=90 if leaf else 0,
                            fontsize=7)  # fmt: skip
        ax.set_title(title)
        ax.set_axis_off()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return True

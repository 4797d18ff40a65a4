"""Launching federations: ``fedbus run`` (all nodes in one process) and ``fedbus node`` (one).

The launcher may import every layer: it turns a `fedbus.topology.Topology`
into data, trainers, protocol machines, transports and node runtimes.
"""

from fedbus.launch.federation import Bus, FederationResult, make_server, open_bus, run_federation

__all__ = ["Bus", "FederationResult", "make_server", "open_bus", "run_federation"]

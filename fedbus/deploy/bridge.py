"""Optional Mosquitto bridges (``fedbus deploy --bridge``): an edge's namespace mirrored upward.

The hierarchical runtime needs no bridge (an edge logs in to its parent's
broker itself, `fedbus.deploy.plan`), so a deployment has none by default.
``--bridge`` adds one per edge broker for operators who want the parent's
broker to *see* an edge group's traffic (a dashboard, a recorder): the edge
broker forwards its own namespace, ``fedbus/<name>.<edge-id>/#``, to its
parent's broker, one way (``out``), and nothing comes back down.

The bridge is not the edge: it logs in to the parent's broker as a user of
its own, ``bridge-<edge-id>``, with its own random password, because
``use_username_as_clientid`` would otherwise give it the edge's client id
and the two connections would knock each other off. On the parent's broker
its ACL allows writing exactly the mirrored namespace (which no node there
uses: the parent's nodes live in the parent's namespace, so the mirror never
reaches them). With ``--tls`` it presents the edge broker's own certificate
(issued with ``clientAuth`` for this) and verifies the parent's.

The price: mosquitto reads a bridge's ``remote_password`` from its config
file only, so with ``--bridge`` the edge brokers' ``mosquitto.conf`` holds
a plaintext secret; `generate` writes those files mode 0600 (docs/deployment.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbus.deploy.conf import BrokerPaths, listener_port
from fedbus.deploy.plan import BrokerPlan, DeploymentPlan

__all__ = ["Bridge", "bridge_user", "bridges_of", "render_bridge", "render_bridge_acl"]


def bridge_user(edge_id: str) -> str:
    """Username (and client id) of ``edge_id``'s bridge on its parent's broker."""
    return f"bridge-{edge_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Bridge:
    """One edge broker's bridge to its parent's broker.

    Attributes:
        service: the edge broker whose config holds the bridge.
        parent: the parent's broker service (where the bridge logs in).
        user: its username and client id there (`bridge_user`).
        topic: the mirrored filter, the edge's namespace (``fedbus/<ns>/#``).
    """

    service: str
    parent: str
    user: str
    topic: str


def bridges_of(plan: DeploymentPlan) -> tuple[Bridge, ...]:
    """One bridge per edge broker, in the plan's order."""
    out = []
    for broker in plan.brokers:
        if broker.uplink is None or broker.aggregator is None:
            continue
        out.append(
            Bridge(
                service=broker.service,
                parent=broker.uplink.broker,
                user=bridge_user(broker.aggregator),
                topic=f"{plan.prefix}/{broker.namespace}/#",
            )
        )
    return tuple(out)


def render_bridge(
    bridge: Bridge,
    password: str,
    *,
    tls: bool,
    address: str | None = None,
    paths: BrokerPaths | None = None,
) -> str:
    """The ``connection`` section appended to the edge broker's mosquitto.conf.

    Args:
        bridge: the bridge.
        password: its password on the parent's broker (written in plain text).
        tls: connect with TLS, presenting the edge broker's certificate.
        address: ``host:port`` of the parent's broker; None is its service
            name and standard port (the compose network).
        paths: where the CA, certificate and key are (the broker's own files).
    """
    paths = paths or BrokerPaths()
    address = address or f"{bridge.parent}:{listener_port(tls)}"
    lines = [
        "",
        f"# fedbus deploy --bridge: mirror {bridge.topic} to {bridge.parent}, one way.",
        f"connection {bridge.user}",
        f"address {address}",
        f"remote_clientid {bridge.user}",
        f"remote_username {bridge.user}",
        f"remote_password {password}",
        f"topic {bridge.topic} out 1",
        "bridge_protocol_version mqttv311",
        # Plain MQTT to the parent (no mosquitto-private handshake), and no $SYS state
        # messages there: its ACL allows the mirrored namespace only.
        "try_private false",
        "notifications false",
        "cleansession true",
        "start_type automatic",
        "restart_timeout 2 30",
    ]
    if tls:
        lines += [
            f"bridge_cafile {paths.cafile}",
            f"bridge_certfile {paths.certfile}",
            f"bridge_keyfile {paths.keyfile}",
            "bridge_insecure false",
            "bridge_tls_version tlsv1.2",
        ]
    return "\n".join(lines) + "\n"


def render_bridge_acl(bridges: tuple[Bridge, ...], parent: BrokerPlan) -> str:
    """ACL lines for the bridges that log in to ``parent``: each writes its namespace only."""
    lines = []
    for bridge in bridges:
        if bridge.parent == parent.service:
            lines += [
                "",
                f"# fedbus deploy --bridge: {bridge.service} mirrors its namespace here.",
                f"user {bridge.user}",
                f"topic write {bridge.topic}",
            ]
    return "\n".join(lines) + ("\n" if lines else "")

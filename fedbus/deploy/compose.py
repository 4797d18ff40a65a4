"""The compose file of a deployment: brokers, server, edges, clients or peers.

Every node service runs ``fedbus node /fedbus/topology.yaml --id ID --broker
URL``. ``--broker`` replaces only the federation's (cloud) broker URL in the
topology; the edges' own brokers come from the deployment topology's edge
``broker`` sections, which is how the runtime picks an edge's two
connections and a device's re-homing targets. So every service names the
cloud broker, and ``depends_on`` lists every broker the node may log in to
(`NodePlan.brokers`). Credentials never appear in the
file: each service mounts its own files as compose secrets at the *same*
paths in every container (``/run/secrets/fedbus_password``, and with TLS
``fedbus_node.pem`` and ``fedbus_node.key``), so the one deployment
topology, whose broker section names those paths (``password_env:
FEDBUS_PASSWORD`` read through ``FEDBUS_PASSWORD_FILE``, ``cert_file``,
``key_file``), serves every node. Services run as the user who generated
the files (``user: UID:GID``): the secrets are mode 0600, and mosquitto's
image would otherwise drop to its own user and fail to read them.
"""

from __future__ import annotations

from typing import Any, Final

from fedbus.deploy.conf import CONTAINER_CERTS, CONTAINER_CONFIG
from fedbus.deploy.conf import listener_port as _port
from fedbus.deploy.plan import CLOUD_BROKER, BrokerPlan, DeploymentPlan, NodePlan
from fedbus.topology import NodeRole

__all__ = [
    "CONTAINER_CA",
    "CONTAINER_TOPOLOGY",
    "MOSQUITTO_IMAGE",
    "NODE_CERT",
    "NODE_KEY",
    "PASSWORD_SECRET",
    "broker_url",
    "render_compose",
]

MOSQUITTO_IMAGE: Final = "eclipse-mosquitto:2"
CONTAINER_TOPOLOGY: Final = "/fedbus/topology.yaml"
CONTAINER_CA: Final = "/fedbus/certs/ca.pem"
CONTAINER_RESULTS: Final = "/fedbus/results"
PASSWORD_SECRET: Final = "fedbus_password"
NODE_CERT: Final = "/run/secrets/fedbus_node.pem"
NODE_KEY: Final = "/run/secrets/fedbus_node.key"


def broker_url(service: str, tls: bool) -> str:
    """The URL under which containers reach broker ``service``."""
    return f"{'mqtts' if tls else 'mqtt'}://{service}:{_port(tls)}"


def _broker_service(plan: DeploymentPlan, broker: BrokerPlan, tls: bool, user: str) -> Any:
    base = f"./brokers/{broker.service}"
    volumes = [f"{base}:{CONTAINER_CONFIG}:ro"]
    if tls:
        volumes += [
            f"./certs/ca/ca.pem:{CONTAINER_CERTS}/ca.pem:ro",
            f"./certs/brokers/{broker.service}.pem:{CONTAINER_CERTS}/server.pem:ro",
            f"./certs/brokers/{broker.service}.key:{CONTAINER_CERTS}/server.key:ro",
        ]
    service: dict[str, Any] = {
        "image": MOSQUITTO_IMAGE,
        "command": ["mosquitto", "-c", f"{CONTAINER_CONFIG}/mosquitto.conf"],
        "user": user,
        "restart": "unless-stopped",
        "volumes": volumes,
    }
    if broker.service == CLOUD_BROKER:
        port = _port(tls)
        service["ports"] = [f"{port}:{port}"]
    return service


def _node_service(node: NodePlan, tls: bool, image: str, user: str) -> Any:
    command = ["fedbus", "node", CONTAINER_TOPOLOGY, "--id", node.id]
    command += ["--broker", broker_url(CLOUD_BROKER, tls)]
    volumes = [f"./topology.yaml:{CONTAINER_TOPOLOGY}:ro"]
    if node.role in (NodeRole.SERVER, NodeRole.EDGE, NodeRole.PEER):  # they write results
        command += ["--out", f"{CONTAINER_RESULTS}/{node.id}"]
        volumes.append(f"./results:{CONTAINER_RESULTS}")
    secrets: list[dict[str, str]] = [
        {"source": f"{node.id}_password", "target": PASSWORD_SECRET},
    ]
    if tls:
        volumes.append(f"./certs/ca/ca.pem:{CONTAINER_CA}:ro")
        secrets += [
            {"source": f"{node.id}_cert", "target": NODE_CERT.rpartition("/")[2]},
            {"source": f"{node.id}_key", "target": NODE_KEY.rpartition("/")[2]},
        ]
    return {
        "image": image,
        "command": command,
        "user": user,
        "restart": "on-failure",
        "environment": {"FEDBUS_PASSWORD_FILE": f"/run/secrets/{PASSWORD_SECRET}"},
        "secrets": secrets,
        "volumes": volumes,
        "depends_on": list(node.brokers or (node.broker,)),
    }


def render_compose(plan: DeploymentPlan, *, tls: bool, image: str, user: str) -> dict[str, Any]:
    """The compose document (a mapping, dumped as YAML by the caller).

    Args:
        plan: the deployment.
        tls: TLS listeners and client certificates.
        image: the image with fedbus installed, for the node services.
        user: ``UID:GID`` the services run as (the owner of the generated files).
    """
    services: dict[str, Any] = {}
    for broker in plan.brokers:
        services[broker.service] = _broker_service(plan, broker, tls, user)
    secrets: dict[str, Any] = {}
    for node in plan.nodes:
        if node.external:
            continue
        services[node.id] = _node_service(node, tls, image, user)
        secrets[f"{node.id}_password"] = {"file": f"./secrets/passwords/{node.id}"}
        if tls:
            secrets[f"{node.id}_cert"] = {"file": f"./certs/nodes/{node.id}.pem"}
            secrets[f"{node.id}_key"] = {"file": f"./certs/nodes/{node.id}.key"}
    document: dict[str, Any] = {"name": plan.project, "services": services}
    if secrets:
        document["secrets"] = secrets
    return document

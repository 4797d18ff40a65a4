"""Deployments generated from a topology: compose file, brokers, credentials, ACLs, TLS.

``fedbus deploy TOPOLOGY.yaml --out DIR [--tls]`` (`fedbus.deploy.command`)
writes everything a containerised federation needs; `plan_deployment`
decides which broker each node uses and in which namespace, the renderers
turn that plan into ACL files, mosquitto configs and the compose
document; ``--bridge`` adds optional one-way bridges (`fedbus.deploy.bridge`).
See docs/deployment.md.
"""

from __future__ import annotations

from fedbus.deploy.acl import render_acl
from fedbus.deploy.conf import BrokerPaths, render_broker_conf
from fedbus.deploy.generate import DEFAULT_IMAGE, Deployment, generate
from fedbus.deploy.plan import (
    BrokerPlan,
    DeploymentPlan,
    NodePlan,
    Uplink,
    edge_namespace,
    plan_deployment,
)

__all__ = [
    "DEFAULT_IMAGE",
    "BrokerPaths",
    "BrokerPlan",
    "Deployment",
    "DeploymentPlan",
    "NodePlan",
    "Uplink",
    "edge_namespace",
    "generate",
    "plan_deployment",
    "render_acl",
    "render_broker_conf",
]

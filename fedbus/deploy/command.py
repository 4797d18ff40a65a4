"""``fedbus deploy``: generate a deployment directory from a topology."""

from __future__ import annotations

import argparse
import sys

from fedbus.errors import ConfigError

__all__ = ["add_command"]


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fedbus deploy`` (DESIGN.md section 1: compose deployments, generated)."""
    from fedbus.deploy.generate import DEFAULT_IMAGE

    parser = sub.add_parser(
        "deploy",
        help="generate a compose deployment with per-node credentials, ACLs and optional TLS",
        description="Write DIR/docker-compose.yml (mosquitto, the server and one service per "
        "non-external node; hierarchical: one broker per edge, which the edge serves while it "
        "also logs in to its parent's broker), the "
        "mosquitto configs, password and ACL files, one random password per node under "
        "DIR/secrets (mode 0600, never printed) and with --tls a test CA and certificates made "
        "with openssl (docs/deployment.md). Exit 0 on success, 2 on invalid input.",
    )
    parser.add_argument("topology", metavar="TOPOLOGY.yaml", help="the topology file")
    parser.add_argument("--out", required=True, metavar="DIR", help="deployment directory")
    parser.add_argument(
        "--tls", action="store_true", help="TLS listeners (8883) and per-node client certificates"
    )
    parser.add_argument(
        "--image",
        default=DEFAULT_IMAGE,
        help=f"image of the node services (default {DEFAULT_IMAGE})",
    )
    parser.add_argument(
        "--user",
        metavar="UID:GID",
        help="user the services run as (default: yours, who owns the files)",
    )
    parser.add_argument(
        "--force", action="store_true", help="regenerate a non-empty DIR (rotates every password)"
    )
    parser.add_argument(
        "--bridge",
        action="store_true",
        help="hierarchical: also mirror each edge's namespace to its parent's broker through a "
        "one-way Mosquitto bridge (not needed by the runtime; puts the bridge's password in the "
        "edge broker's mosquitto.conf, mode 0600)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Generate the deployment; print a summary without any secret."""
    from fedbus.deploy.generate import generate
    from fedbus.topology import TopologyError

    try:
        result = generate(
            args.topology, args.out, tls=args.tls, image=args.image, user=args.user,
            force=args.force, bridge=args.bridge,
        )  # fmt: skip
    except TopologyError as exc:
        print(exc.format(), file=sys.stderr)
        return 2
    except (ConfigError, OSError) as exc:
        print(f"fedbus deploy: {exc}", file=sys.stderr)
        return 2
    plan = result.plan
    started = [n for n in plan.nodes if not n.external]
    print(
        f"wrote {result.out}: {len(plan.brokers)} broker(s), {len(started)} node service(s)"
        f"{', TLS' if result.tls else ''}"
        f"{f', {len(result.bridges)} bridge(s)' if result.bridges else ''}; "
        f"{len(plan.nodes) - len(started)} external node(s) have credentials only"
    )
    print(f"start it with: docker compose -f {result.out}/docker-compose.yml up -d")
    return 0

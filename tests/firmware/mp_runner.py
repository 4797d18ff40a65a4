"""Run the MicroPython client under CPython as a separate node (a subprocess in tests).

    python tests/firmware/mp_runner.py --broker HOST:PORT --id ID --namespace NAME --data FILE.csv
        [--max-payload-bytes N] [--timeout-s S]

Exit 0 when the run finished, 3 on timeout. Prints ``stats {...}`` (JSON) at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--server", default="server")
    parser.add_argument("--max-payload-bytes", type=int, default=131072)
    parser.add_argument("--timeout-s", type=float, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "firmware_clients" / "micropython"))
    sys.path.insert(0, str(ROOT))
    from tests.firmware import umqtt_standin

    umqtt_standin.install()
    import fbclient

    host, port = args.broker.rsplit(":", 1)
    x, y, features = fbclient.load_csv(args.data)
    client = fbclient.Client(
        args.id, args.namespace, x, y, features, host, int(port), server=args.server,
        max_payload_bytes=args.max_payload_bytes,
        log=lambda line: print(f"mp-client {line}", file=sys.stderr, flush=True),
    )  # fmt: skip
    finished = client.run(timeout_s=args.timeout_s)
    print("stats " + json.dumps(client.stats), flush=True)
    return 0 if finished else 3


if __name__ == "__main__":
    sys.exit(main())

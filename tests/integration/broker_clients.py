"""Helpers for the broker tests: drive the real mosquitto_pub/mosquitto_sub clients.

Third-party clients prove that what we start is a broker any MQTT client can
use, not just our own transport. Every call has a deadline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence

import pytest

CLIENT_TIMEOUT_S = 10.0


def require_clients() -> None:
    """Skip unless mosquitto_pub and mosquitto_sub are installed."""
    if shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_pub/mosquitto_sub are not installed (apt install mosquitto-clients)")


def pub(port: int, topic: str, message: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Publish one message (QoS 1) with mosquitto_pub; returns the finished process."""
    return subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            message,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
    )


def exchange(port: int, topic: str, message: str, args: Sequence[str] = ()) -> str:
    """Subscribe with mosquitto_sub, publish until it receives one message; return what it got.

    Publishing repeatedly until the subscriber exits avoids guessing when its
    SUBSCRIBE has reached the broker.

    Raises:
        AssertionError: a client failed or nothing arrived before the deadline.
    """
    wait_s = int(CLIENT_TIMEOUT_S)
    with subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-q",
            "1",
            "-t",
            topic,
            "-C",
            "1",
            "-W",
            str(wait_s),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as sub:
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        published: subprocess.CompletedProcess[str] | None = None
        while sub.poll() is None and time.monotonic() < deadline:
            published = pub(port, topic, message, *args)
            assert published.returncode == 0, f"mosquitto_pub failed: {published.stderr.strip()}"
            time.sleep(0.1)
        try:
            out, err = sub.communicate(timeout=CLIENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            sub.kill()
            sub.communicate()
            raise AssertionError("mosquitto_sub did not finish") from None
    assert sub.returncode == 0, f"mosquitto_sub exited {sub.returncode}: {err.strip()}"
    return out.strip()


def pid_gone(pid: int, deadline_s: float = 5.0) -> bool:
    """Wait until no process has ``pid`` (a zombie counts as gone); False at the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """Direct child pids of ``pid`` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []

"""``fedbus demo``: the README's first command, over each kind of bus."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedbus.broker import ManagedBroker
from fedbus.cli import build_parser
from fedbus.demo import run_demo


def _args(*extra: str) -> object:
    return build_parser().parse_args(["demo", "--clients", "4", "--params", "300000", *extra])


async def test_demo_over_memory_bus_chunks_and_averages_exactly() -> None:
    # 300k float32 = 1.2 MB per model: chunked under a 1 MB packet limit.
    result = await run_demo(_args("--memory", "--rounds", "2"))  # type: ignore[arg-type]
    assert [r["round"] for r in result.rounds] == [1, 2]
    assert all(r["max_error"] < 1e-6 for r in result.rounds)
    assert result.dropped == {}


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_demo_over_mosquitto_with_small_packets(mosquitto: ManagedBroker) -> None:
    # The AWS IoT-class packet limit forces ~10 chunks per model each way.
    result = await run_demo(
        _args("--broker", mosquitto.url, "--max-payload-bytes", "131072", "--rounds", "2")  # type: ignore[arg-type]
    )
    assert len(result.rounds) == 2
    assert all(r["max_error"] < 1e-6 for r in result.rounds)
    assert result.dropped == {}


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_demo_command_starts_and_stops_its_own_broker() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedbus",
            "demo",
            "--clients",
            "3",
            "--params",
            "1000",
            "--rounds",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "round 1/1" in proc.stdout
    assert "dropped messages: none" in proc.stdout


def test_demo_reports_a_one_line_error_when_the_broker_is_unreachable() -> None:
    from fedbus.broker import free_port

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedbus",
            "demo",
            "--broker",
            f"mqtt://127.0.0.1:{free_port()}",
            "--clients",
            "1",
            "--params",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("fedbus demo failed:"), proc.stderr

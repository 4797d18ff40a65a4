"""Fixtures of the firmware tests: the C client built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.firmware.firmware_helpers import build_c_client


@pytest.fixture(scope="session")
def c_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The CMake build dir of firmware_clients/c (fedbus-c-client, fb_tests)."""
    return build_c_client(tmp_path_factory.mktemp("c-build"))


@pytest.fixture(scope="session")
def c_client(c_build: Path) -> Path:
    """The built fedbus-c-client executable."""
    return c_build / "fedbus-c-client"

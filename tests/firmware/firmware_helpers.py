"""Shared by the firmware tests: building the C client, data files, golden vectors.

The C build needs cmake, a C compiler, pkg-config and libmosquitto-dev. When
one is missing the tests that need the build are skipped with the reason,
unless ``FEDBUS_REQUIRE_FIRMWARE=1`` (CI sets it): then they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
C_SOURCE = ROOT / "firmware_clients" / "c"
MP_SOURCE = ROOT / "firmware_clients" / "micropython"
GOLDEN = ROOT / "tests" / "golden"


def require(reason: str) -> None:
    """Skip with ``reason``, or fail when FEDBUS_REQUIRE_FIRMWARE=1."""
    if os.environ.get("FEDBUS_REQUIRE_FIRMWARE") == "1":
        pytest.fail(f"FEDBUS_REQUIRE_FIRMWARE=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def missing_build_tools() -> str | None:
    """Why the C client cannot be built here, or None."""
    if shutil.which("cmake") is None:
        return "cmake is not installed (apt install cmake)"
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return "no C compiler (apt install gcc)"
    if shutil.which("pkg-config") is None:
        return "pkg-config is not installed (apt install pkg-config)"
    probe = subprocess.run(
        ["pkg-config", "--exists", "libmosquitto"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return "libmosquitto-dev is not installed (apt install libmosquitto-dev)"
    return None


def build_c_client(build_dir: Path) -> Path:
    """Configure and build firmware_clients/c into ``build_dir``; returns the build dir."""
    why = missing_build_tools()
    if why is not None:
        require(why)
    for cmd in (
        ["cmake", "-S", str(C_SOURCE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"],
        ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)],
    ):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return build_dir


IGNORED_FIELDS = frozenset({"extras"})
"""Optional message fields the firmware clients do not model; they skip them on decode."""


def vectors() -> list[dict[str, Any]]:
    data: dict[str, Any] = json.loads((GOLDEN / "vectors.json").read_text(encoding="utf-8"))
    return list(data["vectors"])


def exact_vectors() -> list[dict[str, Any]]:
    """The vectors a firmware client re-encodes byte for byte (none with ignored fields)."""
    return [v for v in vectors() if not IGNORED_FIELDS & set(v["fields"])]


def comparable(fields: Any, *, top: bool = True) -> Any:
    """vectors.json ``fields`` with tensors reduced to dtype, shape and data_hex.

    Top-level `IGNORED_FIELDS` are dropped: a firmware client decodes such a
    message and ignores them (an unknown field of a known version).
    """
    if isinstance(fields, dict) and top:
        fields = {k: v for k, v in fields.items() if k not in IGNORED_FIELDS}
    if isinstance(fields, dict):
        if "$tensor" in fields:
            t = fields["$tensor"]
            return {
                "$tensor": {"dtype": t["dtype"], "shape": t["shape"], "data_hex": t["data_hex"]}
            }
        return {k: comparable(v, top=False) for k, v in fields.items()}
    if isinstance(fields, list):
        return [comparable(v, top=False) for v in fields]
    return fields


def assert_same(actual: Any, expected: Any, path: str = "") -> None:
    """Equal values of equal JSON kinds (1 is an int, 1.0 a float), dict order ignored."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), path
        assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for k in expected:
            assert_same(actual[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), path
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}[{i}]")
    else:
        assert type(actual) is type(expected), f"{path}: {actual!r} vs {expected!r}"
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def write_csv(path: Path, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> Path:
    """One sample per line: features (float32, exact repr), then the label."""
    lines = [
        ",".join(repr(float(v)) for v in row) + f",{int(label)}"
        for row, label in zip(x.astype(np.float32), y, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_bin(path: Path, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> Path:
    """The C client's binary data format: FBDS, n, features, float32 LE rows, uint8 labels."""
    x32 = np.ascontiguousarray(x, dtype="<f4")
    n, f = x32.shape
    path.write_bytes(
        b"FBDS" + struct.pack("<II", n, f) + x32.tobytes() + y.astype(np.uint8).tobytes()
    )
    return path

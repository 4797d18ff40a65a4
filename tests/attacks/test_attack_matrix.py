"""benchmarks/attack_matrix.py: it rewrites only its marked block, and uses the shared default."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fedbus.topology.robustness import DEFAULT_ROBUST_VALIDATORS, ValidatorSpec

PATH = Path(__file__).parents[2] / "benchmarks" / "attack_matrix.py"


@pytest.fixture(scope="module")
def matrix() -> ModuleType:
    spec = importlib.util.spec_from_file_location("attack_matrix", PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_write_block_keeps_the_hand_written_text(matrix: ModuleType, tmp_path: Path) -> None:
    doc = tmp_path / "robustness.md"
    doc.write_text(
        f"# Title\n\nintro\n\n{matrix.BEGIN}\nold table\n{matrix.END}\n\n## Notes\nkept\n"
    )
    matrix.write_block(doc, "new table\n")
    text = doc.read_text()
    assert "old table" not in text
    assert (
        text == f"# Title\n\nintro\n\n{matrix.BEGIN}\nnew table\n{matrix.END}\n\n## Notes\nkept\n"
    )
    matrix.write_block(doc, "newer")  # idempotent shape: one block, same surroundings
    assert doc.read_text().count(matrix.BEGIN) == 1
    assert doc.read_text().endswith(f"newer\n{matrix.END}\n\n## Notes\nkept\n")
    fresh = tmp_path / "fresh.md"
    matrix.write_block(fresh, "table")
    assert f"{matrix.BEGIN}\ntable\n{matrix.END}" in fresh.read_text()
    broken = tmp_path / "broken.md"
    broken.write_text(f"text\n{matrix.BEGIN}\nno end marker\n")
    with pytest.raises(SystemExit, match="one matrix marker"):
        matrix.write_block(broken, "table")
    assert broken.read_text() == f"text\n{matrix.BEGIN}\nno end marker\n"


def test_the_default_robust_row_is_the_documented_default(matrix: ModuleType) -> None:
    kinds = [spec["kind"] for spec in DEFAULT_ROBUST_VALIDATORS]
    assert matrix.DEFENSES["default robust"] == ("fedavg", matrix.ROBUST_VALIDATORS)
    assert [spec["kind"] for spec in matrix.ROBUST_VALIDATORS] == kinds
    assert all("validation_fraction" not in spec for spec in matrix.ROBUST_VALIDATORS)
    gate = next(s for s in DEFAULT_ROBUST_VALIDATORS if s["kind"] == "validation_accuracy")
    assert gate["validation_fraction"] == matrix.VALIDATION_FRACTION


def test_the_default_robust_validators_are_a_valid_topology_entry() -> None:
    # Each entry as a topology would hold it: a bad key or value raises here.
    specs = []
    for entry in DEFAULT_ROBUST_VALIDATORS:
        params = {k: v for k, v in entry.items() if k not in ("kind", "validation_fraction")}
        specs.append(
            ValidatorSpec(
                kind=entry["kind"],
                params=params,
                validation_fraction=entry.get("validation_fraction"),
            )
        )
    assert [s.fraction for s in specs] == [0.0, 0.0, 0.5]

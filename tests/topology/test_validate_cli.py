"""``fedbus validate``: output format and exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbus.cli import main

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["centralized", "hierarchical", "gossip"])
def test_valid(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(DATA / f"{name}.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert ": valid: " in out


def test_summary(capsys: pytest.CaptureFixture[str]) -> None:
    main(["validate", str(DATA / "centralized.yaml")])
    assert (
        "digits-fedavg, centralized, 30 rounds, 1 server, 20 clients, 1 external"
        in capsys.readouterr().out
    )


def test_invalid_prints_every_problem(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(DATA / "invalid.yaml")
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert f"{path}:4: protocol.roundz: unknown key 'roundz'; did you mean 'rounds'?" in err
    assert f"{path}:5: protocol.rounds: must be at least 1, got 0" in err
    assert f"{path}:8: training.lr:" in err


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    assert main(["validate", path]) == 2
    assert f"{path}: cannot read" in capsys.readouterr().err


def test_syntax_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nnodes: {clients: [\n")
    assert main(["validate", str(path)]) == 2
    assert f"{path}:3: YAML syntax error" in capsys.readouterr().err

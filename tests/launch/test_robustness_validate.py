"""``fedbus validate`` on the robustness keys: every mistake with its path and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbus.cli import main

BASE = """name: v
data: {dataset: digits}
protocol:
  rounds: 5
  aggregator: AGG
VALIDATORS
nodes:
  server: server
  clients: 10
  external: [client-9]
ATTACKS
"""


def validate(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    *,
    agg: str = "fedavg",
    validators: str = "",
    attacks: str = "",
) -> tuple[int, list[str]]:
    path = tmp_path / "v.yaml"
    text = BASE.replace("AGG", agg).replace("VALIDATORS", validators)
    path.write_text(text.replace("ATTACKS", f"attacks:\n{attacks}" if attacks else ""))
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    prefix = f"{path}:"
    return code, [line.removeprefix(prefix) for line in captured.err.splitlines()[:-1]]


def test_valid_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = validate(
        tmp_path,
        capsys,
        agg="{kind: bulyan, f: 1}",
        validators="  validators: [norm_outlier, {kind: cosine_outlier, reference: median}, "
        "{kind: validation_accuracy, validation_fraction: 0.2, max_drop: 0.1}]",
        attacks="  - {kind: sign_flip, fraction: 0.2, params: {scale: -2}}\n"
        "  - {kind: gaussian, nodes: [client-0], every: 2}\n"
        "  - {kind: model_replacement, nodes: [client-1], rounds: [5]}\n",
    )
    assert code == 0


@pytest.mark.parametrize(
    ("attacks", "expected"),
    [
        ("  - {kind: sign_flop}\n", "12: attacks[0].kind: unknown attack 'sign_flop'; known: alie"),
        ("  - {kind: ipm, fraction: 1.5}\n", "12: attacks[0].fraction: must be a number in [0, 1]"),
        (
            "  - {kind: ipm, fraction: -0.1}\n",
            "12: attacks[0].fraction: must be a number in [0, 1]",
        ),
        ("  - {kind: ipm, fraction: lots}\n", "12: attacks[0].fraction: must be a number, got"),
        (
            "  - {kind: ipm, fraction: 0.01}\n",
            "12: attacks[0].fraction: selects no attacker among the 9 started",
        ),
        (
            "  - {kind: gaussian, nodes: [client-9]}\n",
            "12: attacks[0].nodes[0]: 'client-9' is external: attacks are simulated",
        ),
        (
            "  - {kind: gaussian, nodes: [ghost]}\n",
            "12: attacks[0].nodes[0]: no node named 'ghost'",
        ),
        (
            "  - {kind: gaussian, params: {sdt: 1}}\n",
            "12: attacks[0].params.sdt: unknown key 'sdt'; did you mean 'std'?",
        ),
        ("  - {kind: gaussian, rounds: [6]}\n", "12: attacks[0].rounds[0]: after the last round"),
        ("  - {kind: gaussian, every: 0}\n", "12: attacks[0].every: must be at least 1, got 0"),
        ("  - {kind: gaussian, budget: 1}\n", "12: attacks[0].budget: unknown key 'budget'"),
    ],
)
def test_attack_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], attacks: str, expected: str
) -> None:
    code, lines = validate(tmp_path, capsys, attacks=attacks)
    assert code == 2
    assert any(line.startswith(expected) for line in lines), lines


@pytest.mark.parametrize(
    ("agg", "expected"),
    [
        ("medain", "5: protocol.aggregator: unknown aggregator 'medain'; known: "),
        ("{kind: trimmed_mean, beta: 0.7}", "5: protocol.aggregator.beta: "),
        ("{kind: krum, g: 1}", "5: protocol.aggregator: cannot build aggregator 'krum'"),
        (
            "{kind: bulyan, f: 2}",
            "5: protocol.aggregator.f: bulyan with f=2 needs at least 4f+3 = 11 updates per round, "
            "but only 10 are expected",
        ),
    ],
)
def test_aggregator_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], agg: str, expected: str
) -> None:
    code, lines = validate(tmp_path, capsys, agg=agg)
    assert code == 2
    assert any(line.startswith(expected) for line in lines), lines


def test_bulyan_bound_counts_the_clients_per_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok, _ = validate(tmp_path, capsys, agg="{kind: bulyan, f: 1}")
    code, lines = validate(
        tmp_path, capsys, agg="{kind: bulyan, f: 1}", validators="  clients_per_round: 6"
    )
    assert (ok, code) == (0, 2)
    assert any("needs at least 4f+3 = 7 updates per round, but only 6" in x for x in lines), lines


@pytest.mark.parametrize(
    ("validators", "expected"),
    [
        (
            "  validators: [{kind: norm_outliers}]",
            "6: protocol.validators[0].kind: 'norm_outliers'",
        ),
        (
            "  validators: [{kind: norm_outlier, sigma: 2}]",
            "6: protocol.validators[0].sigma: unknown key 'sigma'; did you mean 'sigmas'?",
        ),
        (
            "  validators: [{kind: cosine_outlier, reference: mode}]",
            "6: protocol.validators[0].reference: must be mean, median or previous",
        ),
        (
            "  validators: [{kind: norm_outlier, validation_fraction: 0.1}]",
            "6: protocol.validators[0].validation_fraction: unknown key",
        ),
        (
            "  validators: [{kind: validation_accuracy, validation_fraction: 1}]",
            "6: protocol.validators[0].validation_fraction: must be in (0, 1)",
        ),
        ("  validators: {kind: norm_outlier}", "6: protocol.validators: must be a list"),
    ],
)
def test_validator_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], validators: str, expected: str
) -> None:
    code, lines = validate(tmp_path, capsys, validators=validators)
    assert code == 2
    assert any(line.startswith(expected) for line in lines), lines


def test_run_refuses_attacks_the_runtime_would_ignore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(
        "name: g\nbroker: memory\ndata: {}\nprotocol: {kind: gossip, rounds: 2, mixing: push_sum}\n"
        "nodes: {peers: 4, graph: {kind: ring}}\nattacks: [{kind: sign_flip, fraction: 0.25}]\n"
    )
    assert main(["validate", str(path)]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "with mixing 'metropolis' only" in capsys.readouterr().err

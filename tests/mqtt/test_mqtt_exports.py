"""fedbus.mqtt's public names exist and are sorted, as tests/test_exported_members.py checks elsewhere."""

from __future__ import annotations

import fedbus.mqtt
import fedbus.transport.lean


def _ruff_order(name: str) -> tuple[int, str]:
    group = 0 if len(name) > 1 and name.isupper() else 1 if name[:1].isupper() else 2
    return group, name


def test_all_names_exist_and_are_sorted() -> None:
    for module in (fedbus.mqtt, fedbus.transport.lean):
        names = module.__all__
        assert [n for n in names if not hasattr(module, n)] == []
        assert names == sorted(names, key=_ruff_order)

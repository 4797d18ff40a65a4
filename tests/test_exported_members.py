"""Every name in a public module's __all__ exists, and __all__ is sorted (httpx's check)."""

from __future__ import annotations

import importlib

import pytest

MODULES = ["fedbus", "fedbus.errors", "fedbus.codec", "fedbus.messages", "fedbus.topics"]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported, f"{name}.__all__ is empty"
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == []
    assert len(set(exported)) == len(exported), "duplicates in __all__"


def isort_key(name: str) -> tuple[int, str]:
    """Ruff's RUF022 order: SCREAMING_CASE, then CamelCase, then the rest."""
    if len(name) > 1 and name.isupper():
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    return group, name


def test_isort_key() -> None:
    shuffled = ["decode", "Tensor", "MAX_NDIM", "Ack", "DTYPES", "__version__", "encode"]
    assert sorted(shuffled, key=isort_key) == [
        "DTYPES",
        "MAX_NDIM",
        "Ack",
        "Tensor",
        "__version__",
        "decode",
        "encode",
    ]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted(name: str) -> None:
    exported = importlib.import_module(name).__all__
    assert list(exported) == sorted(exported, key=isort_key)


@pytest.mark.parametrize("name", MODULES)
def test_public_classes_and_functions_are_exported(name: str) -> None:
    module = importlib.import_module(name)
    defined_here = [
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and getattr(obj, "__module__", None) == name
        and (isinstance(obj, type) or callable(obj))
    ]
    assert sorted(set(defined_here) - set(module.__all__)) == []

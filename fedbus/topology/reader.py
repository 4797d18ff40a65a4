"""Typed reading of located YAML mappings, collecting problems instead of raising.

The schema modules describe each section as "these keys, these types"; this
module does the reading, the unknown-key check (with a difflib suggestion)
and the bookkeeping that re-roots a config object's own problems under the
section's YAML path and line. Adding a key to a section is one more
``section.integer("key", default)`` call and one dataclass field.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from fedbus.errors import ConfigError
from fedbus.topology.problems import Checked, Problem, TopologyError, join_path, unchecked
from fedbus.topology.yamlpos import Located, ParsedYaml

__all__ = ["Context", "Section", "plain_data", "type_name"]

T = TypeVar("T")
C = TypeVar("C", bound=Checked)
V = TypeVar("V")


def type_name(value: object) -> str:
    """How YAML would call the type of ``value``, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def plain_data(node: Located) -> Any:
    """The plain Python value of a located node (for free-form aggregator params)."""
    if node.is_mapping:
        return {k: plain_data(v) for k, v in node.value.items()}
    if node.is_sequence:
        return [plain_data(v) for v in node.value]
    return node.value


class Context:
    """Problems found so far, and the line index to place them.

    Attributes:
        degraded: a value was replaced by its default after a problem, so
            checks across sections could report problems that are not real.
    """

    def __init__(self, parsed: ParsedYaml) -> None:
        self.parsed = parsed
        self.problems: list[Problem] = list(parsed.problems)
        self.degraded = False

    def add(
        self, path: str, message: str, *, line: int | None = None, degrade: bool = True
    ) -> None:
        """Record a problem; ``degrade`` says a default now stands in for a bad value."""
        self.problems.append(
            Problem(path=path, message=message, line=line or self.parsed.line_of(path))
        )
        self.degraded = self.degraded or degrade

    def build(self, path: str, make: type[C], /, *, fallback: C | None = None, **kwargs: Any) -> C:
        """``make(**kwargs)``; on a problem, record it under ``path`` and go on.

        Returns ``fallback``, or by default the object as read but unchecked,
        so that checks spanning sections still run and find more problems.
        """
        try:
            return make(**kwargs)
        except TopologyError as exc:
            for problem in exc.problems:
                self.add(join_path(path, problem.path), problem.message, degrade=False)
        except ConfigError as exc:
            self.add(join_path(path, exc.path or ""), exc.message, degrade=False)
        return fallback if fallback is not None else unchecked(make, **kwargs)


class Section:
    """One YAML mapping being read.

    Args:
        ctx: where problems go.
        node: the mapping (None: absent, every key takes its default).
        path: its YAML path.
        keys: the keys it may have; others are reported as unknown.
        open_keys: accept any other key (aggregator parameters).
    """

    def __init__(
        self,
        ctx: Context,
        node: Located | None,
        path: str,
        keys: Collection[str],
        *,
        open_keys: bool = False,
    ) -> None:
        self.ctx = ctx
        self.path = path
        self.items: dict[str, Located] = {}
        self.line = node.line if node is not None else ctx.parsed.line_of(path)
        if node is None or (node.value is None and not node.is_mapping):
            return
        if not node.is_mapping:
            ctx.add(path, f"must be a mapping, got {type_name(node.value)}")
            return
        self.items = dict(node.value)
        if open_keys:
            return
        for key, key_line in node.key_lines.items():
            if key not in keys:
                guess = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
                hint = (
                    f"; did you mean {guess[0]!r}?"
                    if guess
                    else f" (known: {', '.join(sorted(keys))})"
                )
                ctx.add(
                    join_path(path, key), f"unknown key {key!r}{hint}", line=key_line, degrade=False
                )
                del self.items[key]

    def has(self, key: str) -> bool:
        """Whether ``key`` is present (even as null)."""
        return key in self.items

    def node(self, key: str) -> Located | None:
        """The located value of ``key``, or None when absent."""
        return self.items.get(key)

    def at(self, key: str) -> str:
        """The YAML path of ``key`` in this section."""
        return join_path(self.path, key)

    def _get(self, key: str, default: T, check: Callable[[Located], V | None], what: str) -> V | T:
        node = self.items.get(key)
        if node is None:
            return default
        value = check(node)
        if value is None:
            self.ctx.add(
                self.at(key), f"must be {what}, got {type_name(node.value)}", line=node.line
            )
            return default
        return value

    def integer(self, key: str, default: T) -> int | T:
        """An integer (booleans are not integers here)."""
        return self._get(key, default, _as_int, "an integer")

    def opt_integer(self, key: str) -> int | None:
        """An integer or null."""
        return self._get(key, None, _as_int, "an integer")

    def number(self, key: str, default: T) -> float | T:
        """A number; an unquoted ``1e-3`` (a string to YAML 1.1) counts as one."""
        return self._get(key, default, _as_float, "a number")

    def opt_number(self, key: str) -> float | None:
        """A number or null."""
        return self._get(key, None, _as_float, "a number")

    def text(self, key: str, default: T) -> str | T:
        """A string."""
        return self._get(key, default, _as_str, "a string")

    def flag(self, key: str, default: bool) -> bool:
        """A boolean (true/false)."""
        return self._get(key, default, _as_bool, "true or false")

    def str_list(self, key: str) -> tuple[str, ...]:
        """A list of strings (a single string is not a list)."""
        node = self.items.get(key)
        if node is None or node.value is None:
            return ()
        if not node.is_sequence:
            self.ctx.add(
                self.at(key), f"must be a list, got {type_name(node.value)}", line=node.line
            )
            return ()
        out: list[str] = []
        for i, item in enumerate(node.value):
            if isinstance(item.value, str):
                out.append(item.value)
            else:
                path = f"{self.at(key)}[{i}]"
                self.ctx.add(path, f"must be a string, got {type_name(item.value)}", line=item.line)
        return tuple(out)


def _as_int(node: Located) -> int | None:
    value = node.value
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_float(node: Located) -> float | None:
    value = node.value
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and node.plain:
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _as_str(node: Located) -> str | None:
    return node.value if isinstance(node.value, str) else None


def _as_bool(node: Located) -> bool | None:
    return node.value if isinstance(node.value, bool) else None

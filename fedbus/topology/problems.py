"""Validation problems and the one error that carries all of them.

A user fixing a topology file wants every mistake at once, not one per run,
so validation never stops at the first problem: config objects and the YAML
reader both *collect* `Problem` records and raise a single `TopologyError`.

Config dataclasses report paths relative to themselves (``rounds``); the YAML
reader re-roots them (``protocol.rounds``) and adds the line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

from fedbus.errors import ConfigError

_C = TypeVar("_C", bound="Checked")

__all__ = ["Checked", "Problem", "TopologyError", "join_path", "unchecked"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One thing wrong with a topology.

    Attributes:
        path: dotted YAML path (``nodes.edges[1].clients``); "" for the whole file.
        message: what is wrong, phrased for the person editing the file.
        line: 1-based line in the YAML file, when known.
    """

    path: str
    message: str
    line: int | None = None

    def format(self, filename: str | None = None) -> str:
        """Render as ``FILE:LINE: PATH: message`` (compiler style, so editors can jump)."""
        where = [filename or "<topology>"]
        if self.line is not None:
            where.append(str(self.line))
        head = ":".join(where)
        return f"{head}: {self.path}: {self.message}" if self.path else f"{head}: {self.message}"


class TopologyError(ConfigError):
    """A topology is invalid; `problems` lists every problem found.

    Args:
        problems: at least one problem.
        filename: the file they come from, if any.

    The inherited ``path``/``line``/``message`` describe the first problem, so
    code that handles a plain `ConfigError` still gets a useful message.
    """

    def __init__(self, problems: Iterable[Problem], *, filename: str | None = None) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        if not self.problems:
            raise ValueError("TopologyError needs at least one problem")
        self.filename = filename
        first = self.problems[0]
        more = len(self.problems) - 1
        message = first.message + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")
        super().__init__(message, path=first.path or None, line=first.line)

    def format(self) -> str:
        """Every problem, one ``FILE:LINE: PATH: message`` line each."""
        return "\n".join(p.format(self.filename) for p in self.problems)


def join_path(prefix: str, rel: str) -> str:
    """Join a parent path and a relative one: ``("nodes", "edges[0].id")``, ``("a[1]", "[2]")``."""
    if not prefix:
        return rel
    if not rel:
        return prefix
    return prefix + rel if rel.startswith("[") else f"{prefix}.{rel}"


class Checked:
    """Mixin for config dataclasses: ``__post_init__`` raises all of `_problems` at once.

    Subclasses yield ``(relative path, message)`` pairs from `_problems`, so a
    config object built in Python validates itself as thoroughly as one read
    from YAML, and the YAML reader can re-root the paths.
    """

    __slots__ = ()

    def __post_init__(self) -> None:
        found = [Problem(path=p, message=m) for p, m in self._problems()]
        if found:
            raise TopologyError(found)

    def _problems(self) -> Iterator[tuple[str, str]]:
        return iter(())


def unchecked(cls: type[_C], **kwargs: Any) -> _C:
    """Build ``cls`` without validation, for a stand-in after its problems were recorded.

    Lets the YAML reader keep an invalid part's ids in view for the checks
    that span parts, instead of dropping it and reporting knock-on problems.
    """
    obj = object.__new__(cls)
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in kwargs:
            value = kwargs[f.name]
        elif f.default is not MISSING:
            value = f.default
        else:
            value = f.default_factory()  # type: ignore[operator]
        object.__setattr__(obj, f.name, value)
    return obj

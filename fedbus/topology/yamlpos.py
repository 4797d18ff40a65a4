"""YAML with positions: every value keeps the line it came from.

``yaml.safe_load`` throws line numbers away, yet a validation message is only
useful if it says where to look. This module composes the document with
PyYAML's ``SafeLoader`` (never an unsafe loader: topology files come from
users and may be shared), then turns each node into a `Located` value that
keeps its line, and records every path's line in an index so that problems
found later, deep inside config objects, can still be placed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from fedbus.topology.problems import Problem, join_path

__all__ = ["Located", "ParsedYaml", "parse_yaml"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Located:
    """A YAML value and where it is.

    Attributes:
        value: ``dict[str, Located]`` for a mapping (file order), ``list[Located]``
            for a sequence, else the scalar as SafeLoader resolves it.
        line: 1-based line of the value.
        plain: the scalar was written unquoted, so ``1e-3`` (a string to YAML
            1.1) may be read as the number the user meant.
        key_lines: for a mapping, the line of each key.
    """

    value: Any
    line: int
    plain: bool = False
    key_lines: dict[str, int] = field(default_factory=dict)

    @property
    def is_mapping(self) -> bool:
        """Whether this is a YAML mapping."""
        return isinstance(self.value, dict)

    @property
    def is_sequence(self) -> bool:
        """Whether this is a YAML sequence."""
        return isinstance(self.value, list)


@dataclass(slots=True, kw_only=True)
class ParsedYaml:
    """The result of `parse_yaml`.

    Attributes:
        root: the document, or None when empty or unreadable.
        lines: path -> line for every value and key in the document.
        problems: structural problems (syntax, duplicate or non-string keys).
    """

    root: Located | None
    lines: dict[str, int]
    problems: list[Problem]

    def line_of(self, path: str) -> int | None:
        """The line of ``path`` or of its nearest ancestor present in the file."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            cut = max(path.rfind("."), path.rfind("["))
            path = path[: max(cut, 0)]


def parse_yaml(text: str) -> ParsedYaml:
    """Compose ``text`` with SafeLoader and convert it to `Located` values.

    Never raises for bad input: a syntax error becomes a problem with its line.
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            message = f"YAML syntax error: {exc.problem or exc.context or exc}"
            return ParsedYaml(
                root=None, lines={}, problems=[Problem(path="", message=message, line=line)]
            )
        except yaml.YAMLError as exc:
            return ParsedYaml(
                root=None, lines={}, problems=[Problem(path="", message=f"YAML error: {exc}")]
            )
        walker = _Walker(loader)
        root = walker.convert(node, "", depth=0) if node is not None else None
        return ParsedYaml(root=root, lines=walker.lines, problems=walker.problems)
    finally:
        loader.dispose()


_MAX_DEPTH = 64
"""Deeper documents are refused: aliases can make a small file expand without bound."""


class _Walker:
    def __init__(self, loader: yaml.SafeLoader) -> None:
        self.loader = loader
        self.lines: dict[str, int] = {}
        self.problems: list[Problem] = []

    def convert(self, node: yaml.Node, path: str, *, depth: int) -> Located:
        line = node.start_mark.line + 1
        self.lines.setdefault(path, line)
        if depth > _MAX_DEPTH:
            self.problems.append(Problem(path=path, message="nested too deeply", line=line))
            return Located(value=None, line=line)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, line, depth)
        if isinstance(node, yaml.SequenceNode):
            items = [
                self.convert(child, f"{path}[{i}]", depth=depth + 1)
                for i, child in enumerate(node.value)
            ]
            return Located(value=items, line=line)
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.problems.append(Problem(path=path, message=f"unreadable value: {exc}", line=line))
            value = None
        plain = isinstance(node, yaml.ScalarNode) and node.style is None
        return Located(value=value, line=line, plain=plain)

    def _mapping(self, node: yaml.MappingNode, path: str, line: int, depth: int) -> Located:
        try:
            # Resolves YAML merge keys (<<: *base) the way safe_load would.
            self.loader.flatten_mapping(node)
        except yaml.YAMLError as exc:
            self.problems.append(Problem(path=path, message=f"bad merge key: {exc}", line=line))
        out: dict[str, Located] = {}
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str) or key_node.tag != "tag:yaml.org,2002:str":
                shown = key if key is not None else "<complex>"
                message = f"key {shown!r} must be a string"
                self.problems.append(Problem(path=path, message=message, line=key_line))
                continue
            child = join_path(path, key)
            if key in out:
                message = f"duplicate key {key!r} (first at line {key_lines[key]})"
                self.problems.append(Problem(path=child, message=message, line=key_line))
                continue
            key_lines[key] = key_line
            self.lines[child] = key_line
            out[key] = self.convert(value_node, child, depth=depth + 1)
        return Located(value=out, line=line, key_lines=key_lines)

"""YAML text -> plain Python values that remember the line each key and value came from.

`read_yaml` composes the node tree with PyYAML's safe loader (no Python objects, no custom
tags) and converts it into `YMap` (a dict) and `YSeq` (a list) carrying line numbers, so
validation can say `experiments.yaml:12: hosts.gpu-box.prot: unknown key`. Anything the
parser or the converter rejects becomes one ConfigError line with file and line.
"""
from __future__ import annotations

from typing import Any, NoReturn

import yaml
import yaml.reader
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..errors import ConfigError

MAX_DEPTH = 50
MAX_VALUES = 100_000   # values after expanding aliases: a real file has a few hundred
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


class YMap(dict):
    """A mapping from the file: `line` of the mapping, `key_lines`/`value_lines` per key."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[str, int] = {}
        self.value_lines: dict[str, int] = {}


class YSeq(list):
    """A sequence from the file: `line` of the sequence, `item_lines` per item."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


def printable(text: str) -> str:
    """`text` with control characters escaped, so a message stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(filename: str, line: int, path: str, message: str, hint: str | None = None) -> NoReturn:
    where = f"{filename}:{line}" if line else filename
    path, message = printable(path), printable(message)
    raise ConfigError(f"{where}: {path}: {message}" if path else f"{where}: {message}", hint=hint)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


class _Converter:
    def __init__(self, filename: str, loader: yaml.SafeLoader) -> None:
        self.filename = filename
        self.loader = loader
        self.active: set[int] = set()

    def convert(self, node: Node, path: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            fail(self.filename, _line(node), path, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, ScalarNode):
            try:
                return self.loader.construct_object(node, deep=True)
            except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
                problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                fail(self.filename, _line(node), path, f"cannot read value {node.value!r}: {problem}",
                     hint="quote the value if it is meant as text")
        if id(node) in self.active:
            fail(self.filename, _line(node), path, "an alias refers to itself (recursive anchor)")
        self.active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path, depth)
            if isinstance(node, SequenceNode):
                if node.tag != _SEQ_TAG:
                    fail(self.filename, _line(node), path, f"unsupported tag {node.tag!r}")
                seq = YSeq(_line(node))
                for i, item in enumerate(node.value):
                    seq.append(self.convert(item, f"{path}[{i}]", depth + 1))
                    seq.item_lines.append(_line(item))
                return seq
        finally:
            self.active.discard(id(node))
        fail(self.filename, _line(node), path, "unsupported YAML node")

    def _mapping(self, node: MappingNode, path: str, depth: int) -> YMap:
        if node.tag != _MAP_TAG:
            fail(self.filename, _line(node), path, f"unsupported tag {node.tag!r}")
        explicit = {id(k) for k, _v in node.value if k.tag != "tag:yaml.org,2002:merge"}
        try:
            self.loader.flatten_mapping(node)          # resolves `<<: *anchor` merge keys
        except (yaml.YAMLError, RecursionError) as exc:
            fail(self.filename, _line(node), path, f"bad merge key: {getattr(exc, 'problem', exc)}")
        out = YMap(_line(node))
        merged: set[str] = set()                       # keys that came from a merge (overridable)
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                fail(self.filename, _line(key_node), path, "a key must be plain text, not a list or mapping")
            key = self.convert(key_node, path, depth + 1)
            if not isinstance(key, str):
                shown = key_node.value
                fail(self.filename, _line(key_node), f"{path}.{shown}" if path else str(shown),
                     "a key must be text", hint=f"quote it: \"{shown}\":")
            sub = f"{path}.{key}" if path else key
            from_merge = id(key_node) not in explicit
            if key in out:
                if from_merge:
                    continue                           # an explicit key (or an earlier merge) wins
                if key not in merged:
                    fail(self.filename, _line(key_node), sub,
                         f"duplicate key (first given on line {out.key_lines[key]})")
            if from_merge:
                merged.add(key)
            else:
                merged.discard(key)
            out[key] = self.convert(value_node, sub, depth + 1)
            out.key_lines[key] = _line(key_node)
            out.value_lines[key] = _line(value_node)
        return out


def expanded_size(node: Node, cap: int = MAX_VALUES) -> int:
    """How many values `node` becomes once every alias (and `<<:` merge) is expanded, counted
    on the composed graph (each distinct node once, memoised), so a small file of nested aliases
    (a "billion laughs") is measured without expanding it; stops counting past `cap`."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(n: Node) -> int:
        key = id(n)
        if key in memo:
            return memo[key]
        if key in active:          # a recursive alias: the converter reports it
            return 1
        active.add(key)
        total = 1
        if isinstance(n, SequenceNode):
            for item in n.value:
                total += size(item)
                if total > cap:
                    break
        elif isinstance(n, MappingNode):
            for k, v in n.value:
                total += size(k) + size(v)
                if total > cap:
                    break
        active.discard(key)
        memo[key] = min(total, cap + 1)
        return memo[key]

    return size(node)


def _reader_line(text: str, exc: yaml.reader.ReaderError) -> int:
    pos = exc.position if isinstance(exc.position, int) else 0
    return text[:pos].count("\n") + 1


def read_yaml(text: str, filename: str) -> Any:
    """Parse one YAML document into YMap/YSeq/scalars; None for an empty document."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:
        fail(filename, _reader_line(text, exc), "", f"malformed YAML: {exc.reason} "
             f"(character {exc.character!r} is not allowed)")
    try:
        try:
            node = loader.get_single_node()
        except yaml.reader.ReaderError as exc:
            fail(filename, _reader_line(text, exc), "", f"malformed YAML: {exc.reason} "
                 f"(character {exc.character!r} is not allowed)")
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 0
            problem = exc.problem or exc.context or "cannot parse"
            ctx = exc.context_mark
            if exc.context and exc.problem:
                if exc.context.startswith("expected"):
                    problem = f"{exc.context}, {problem}"
                elif ctx is not None and ctx.line + 1 != line:
                    problem += f" ({exc.context} that starts on line {ctx.line + 1})"
            fail(filename, line, "", f"malformed YAML: {problem}",
                 hint="check indentation, colons and quotes on that line")
        except yaml.YAMLError as exc:
            fail(filename, 0, "", f"malformed YAML: {str(exc).splitlines()[0]}")
        except RecursionError:
            fail(filename, 0, "", "malformed YAML: nested too deeply")
        if node is None:
            return None
        try:
            if expanded_size(node) > MAX_VALUES:
                fail(filename, _line(node), "", f"the file expands to more than {MAX_VALUES:,} values "
                     "once its aliases (*name) are expanded; refusing to read it",
                     hint="use anchors and aliases for sharing settings, not for repeating them")
            return _Converter(filename, loader).convert(node, "")
        except RecursionError:
            fail(filename, _line(node), "", f"nested more than {MAX_DEPTH} levels deep")
    finally:
        loader.dispose()

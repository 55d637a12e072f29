"""Reading YAML documents that may be hostile, with one-line errors.

PyYAML's SafeLoader refuses arbitrary objects but still lets a small document expand into a huge
one through aliases (the "billion laughs"), recurse without bound on deep nesting, and silently
keep the last of two duplicate keys. We compose the node graph first, measure it with aliases
expanded (memoised, so measuring a bomb is cheap), and only then build Python objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from crv.base.errors import SpecError

MAX_DOCUMENT_BYTES = 1 << 20  # appliance files are hand-written; a megabyte is already absurd
MAX_EXPANDED_NODES = 100_000  # scalars + collections, counting every alias expansion
MAX_DEPTH = 64

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _measure(root: yaml.Node) -> tuple[int, int]:
    """Expanded node count and depth, iteratively; raises ValueError on a recursive alias."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        kids = _children(node)
        if finished:
            total = 1 + sum(size[id(k)] for k in kids)
            size[key] = min(total, MAX_EXPANDED_NODES + 1)  # clamp: keeps the ints small
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            on_path.discard(key)
            continue
        if key in size:
            continue
        if key in on_path:
            raise ValueError("an alias refers to a node that contains it (recursive alias)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)
    return size[id(root)], depth[id(root)]


def load_yaml_file(path: Path, *, shown_as: str | None = None) -> Any:
    """Parse one YAML document from `path`; every refusal is a SpecError naming the file."""
    name = shown_as or str(path)
    try:
        if not path.is_file():
            raise SpecError(name, "", "no such file")
        if path.stat().st_size > MAX_DOCUMENT_BYTES:
            raise SpecError(name, "", f"file is larger than {MAX_DOCUMENT_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(name, "", f"cannot read: {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise SpecError(name, "", "binary file (contains NUL bytes), expected YAML text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(name, "", f"not UTF-8 text (byte {exc.start})") from None
    return parse_yaml(text, name)


def parse_yaml(text: str, name: str) -> Any:
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise SpecError(name, "", "empty document")
        size, depth = _measure(root)
        if size > MAX_EXPANDED_NODES:
            raise SpecError(
                name, "", f"document expands to more than {MAX_EXPANDED_NODES} nodes (alias bomb?)"
            )
        if depth > MAX_DEPTH:
            raise SpecError(name, "", f"document is nested deeper than {MAX_DEPTH} levels")
        return loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = ", ".join(part for part in (exc.context, exc.problem) if part)
        raise SpecError(name, "", f"invalid YAML: {where}{what}") from None
    except yaml.YAMLError as exc:
        raise SpecError(name, "", f"invalid YAML: {exc}") from None
    except RecursionError:
        raise SpecError(name, "", f"document is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise SpecError(name, "", f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()

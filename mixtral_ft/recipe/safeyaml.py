"""YAML for recipes, with bounds: refused fast, before anything walks the result, when it could blow up.

PyYAML's safe loader accepts aliases that expand exponentially (`x2: &x2 {a: *x1, b: *x1}`: each level doubles
what a walk of the result visits), nesting deep enough to exhaust Python's recursion limit, and duplicate keys
(the last one silently wins). Here: a size cap on the text, a nesting cap while composing, a cap on the size the
node graph expands to (counted once per shared node, so the count itself is linear), and duplicate keys are an
error naming the key and its line. Every refusal is a `YamlBound` with a one-line message.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_BYTES = 1 * 2**20  # a recipe is a few KiB
MAX_DEPTH = 64
MAX_NODES = 100_000  # values after alias expansion


class YamlBound(Exception):
    """The text is valid YAML but exceeds a bound, or repeats a key: the message says which."""


class _Loader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlBound(f"nests deeper than {MAX_DEPTH} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults` then a key of its own is an override, not a duplicate
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise YamlBound(f"repeats the key '{key}' (line {key_node.start_mark.line + 1}): keep one")
                    seen.add(key)
                except TypeError:
                    pass  # an unhashable key: the base constructor reports it
        return super().construct_mapping(node, deep)


def _expanded_size(node, memo: dict, active: set) -> int:
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in active:
        raise YamlBound("has an alias that contains itself (a recursive anchor)")
    active.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo, active) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo, active) + _expanded_size(v, memo, active) for k, v in node.value)
    else:
        size = 1
    active.discard(id(node))
    if size > MAX_NODES:
        raise YamlBound(f"expands to more than {MAX_NODES:,} values (YAML aliases &/*): write the values out")
    memo[id(node)] = size
    return size


def load(text: str) -> Any:
    """Like yaml.safe_load, within the bounds above; raises YamlBound, or yaml.YAMLError for invalid YAML."""
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise YamlBound(f"is larger than {MAX_BYTES // 2**20} MiB")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    except RecursionError:
        raise YamlBound("nests too deeply") from None
    finally:
        loader.dispose()

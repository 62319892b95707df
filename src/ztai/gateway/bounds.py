"""The one depth bound on JSON a client sends (request bodies and MCP messages alike).

orjson parses nesting up to its own limit; this check keeps what ztai walks afterwards (inspection,
policy context, provenance) to `server.max_json_depth` levels, without recursion.
"""

from __future__ import annotations

from typing import Any


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether objects and arrays in `value` nest more than `limit` levels (the top level is 1)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False

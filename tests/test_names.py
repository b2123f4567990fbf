"""The name registry's claim, checked: product code writes counters only through the names in
`cache_store.counter_names`, never as string literals, so a writer and a reader cannot drift."""

from __future__ import annotations

import ast
from pathlib import Path

from cache_store import counter_names as cn

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("worker", "cache_store", "cluster")
WRITES = {"add", "add_many"}


def _receiver(node: ast.expr) -> str:
    """The last name of a call's receiver: `self.router.counters.add` -> "counters"."""
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _spelled(node: ast.expr) -> bool:
    """A name written in place: a string literal, an f-string, or a dict literal with one as a key."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return True
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.Dict):
        return any(k is not None and _spelled(k) for k in node.keys)
    return False


def literal_counter_writes(source: str) -> list[int]:
    """Lines of `<...>.counters.add(...)` / `.add_many(...)` calls whose name is spelled in place."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr in WRITES and _receiver(node.func.value) == "counters" and node.args:
            if _spelled(node.args[0]):
                lines.append(node.lineno)
    return lines


def test_the_scan_finds_a_counter_spelled_in_place():
    src = (
        "self.counters.add('routed')\n"
        "counters.add(f'placement_{r}')\n"
        "c.counters.add_many({'requests': 1})\n"
        "self.counters.add(ROUTED)\n"
        "self.counters.add_many({miss_tokens(k): v for k, v in d.items()})\n"
        "things.add('not a counter')\n"
    )
    assert literal_counter_writes(src) == [1, 2, 3]


def test_no_product_module_writes_a_counter_name_as_a_literal():
    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            found += [f"{path.relative_to(ROOT)}:{n}" for n in literal_counter_writes(path.read_text())]
    assert not found, f"counter names spelled in place (import them from cache_store.counter_names): {found}"


def test_every_registered_name_is_spelled_once():
    values = [v for k, v in vars(cn).items() if k.isupper() and isinstance(v, str)]
    assert len(values) == len(set(values)), "two constants in counter_names share a name"
    lease = [v for k, v in vars(cn.LeaseField).items() if k.isupper() and isinstance(v, str)]
    assert len(lease) == len(set(lease)), "two lease fields share a name"

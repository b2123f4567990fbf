"""Nothing from Redis, Ray messages or files is ever unpickled by this project's code."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache_store", "worker", "cluster")
FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "marshal", "joblib"}
FORBIDDEN_CALLS = {("torch", "load"), ("numpy", "load"), ("np", "load")}


def sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", list(sources()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_in_product_code(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = {(node.module or "").split(".")[0]}
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
        ):
            assert (node.func.value.id, node.func.attr) not in FORBIDDEN_CALLS, f"{path}:{node.lineno} unpickles"
            continue
        else:
            continue
        assert not names & FORBIDDEN_MODULES, f"{path}:{node.lineno} imports {names & FORBIDDEN_MODULES}"


def test_the_scan_sees_the_packages():
    assert len(list(sources())) > 20

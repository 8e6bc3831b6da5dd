"""Which tests start another Python process (a script, `python -m ditkit`, torchrun), read from the source.

conftest.py marks those tests `subprocess`, so `pytest -m "not subprocess"` leaves them out. A test starts one
if its function, a fixture it asks for, or a function it calls (of its own file, or imported from tests/helpers
or benchmarks/) names `sys.executable`, `Popen` or torch's multiprocessing spawn in its code (string literals do
not count). Read with `ast`; nothing is run. Short non-Python commands (mount, umount) and DataLoader workers do
not count either. The reading is static, so it errs on the side of marking: every parametrized case of a test
whose code can reach a process start is marked, also cases that take another branch (test_bad_input's non-VAE
cases).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

# Where the imported helpers of a test file live (tests/helpers/..., benchmarks/ for the soak harness).
ROOTS = (Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[2] / "benchmarks")


def _starts_a_process(node: ast.AST) -> bool:
    """The code (not its string literals) names sys.executable, Popen, or torch's multiprocessing spawn."""
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
            if (n.value.id, n.attr) in {("sys", "executable"), ("mp", "spawn"), ("multiprocessing", "spawn")}:
                return True
        if (isinstance(n, ast.Attribute) and n.attr in {"Popen", "start_processes"}) or (
                isinstance(n, ast.Name) and n.id in {"Popen", "start_processes"}):
            return True
    return False


def _referenced(node: ast.AST) -> set[str]:
    """Names a function reads anywhere in its body, and its parameters (fixtures are asked for by name)."""
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        names |= {a.arg for a in node.args.args + node.args.kwonlyargs}
    return names


def _imported_spawners(tree: ast.Module) -> set[str]:
    """Local names bound by `from module import name [as local]` to a function that spawns, for modules of
    tests/ (helpers.x) and benchmarks/."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            relative = node.module.replace(".", "/") + ".py"
            for path in (root / relative for root in ROOTS):
                if path.exists():
                    found |= {a.asname or a.name for a in node.names if a.name in spawning_functions(path)}
    return found


@cache
def spawning_functions(path: Path) -> frozenset[str]:
    """Module-level functions (tests, fixtures and helpers alike) of `path` that start a Python process, directly
    or through another function or fixture of the file, or a function imported from tests/helpers or benchmarks/."""
    tree = ast.parse(path.read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    spawning = {name for name, node in funcs.items() if _starts_a_process(node)}
    spawning |= _imported_spawners(tree)
    refs = {name: _referenced(node) for name, node in funcs.items()}
    grew = True
    while grew:  # a fixed point: callers of spawners spawn
        new = {name for name, names in refs.items() if name not in spawning and names & spawning}
        spawning |= new
        grew = bool(new)
    return frozenset(spawning)

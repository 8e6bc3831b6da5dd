"""The code's shape, as the issue-14 redesign promises it: no import cycle among ditkit's modules (imports inside
functions included), and no function in src/ditkit longer than 100 lines. Read with `ast`, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
BENCHMARKS = SRC.parent / "benchmarks"
MAX_LINES = 100


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `root` (a package's __init__ is the package)."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same tree it imports anywhere (top level or inside functions).

    `from pkg import name` counts as importing `pkg.name` when that is a module, else `pkg`. A module's own
    parent packages are left out: Python imports them before the module in any case.
    """
    mods = modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in mods:
                        targets.add(full)
                    elif node.module in mods:
                        targets.add(node.module)
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = targets - parents - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle_through_an_in_function_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from pkg import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(tmp_path)) == [["pkg.a", "pkg.b"]]


def test_no_import_cycles_in_ditkit():
    graph = import_graph(SRC)
    assert "ditkit.weights.checkpoints" in graph and graph["ditkit.train.loop"]  # the walk saw the package
    assert cycles(graph) == []


def long_functions(root: Path) -> list[str]:
    """`module.function: N lines` for every function under `root` longer than MAX_LINES."""
    long = []
    for name, path in modules(root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    return long


def test_no_function_in_ditkit_is_longer_than_100_lines():
    assert long_functions(SRC) == []


def test_no_function_in_benchmarks_is_longer_than_100_lines():
    assert "bench_speed" in modules(BENCHMARKS)  # the walk saw the folder
    assert long_functions(BENCHMARKS) == []


def sys_path_edits(root: Path) -> list[str]:
    """Files under `root` that call sys.path.insert / append / extend (relative paths)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "insert", "append", "extend") and ast.unparse(node.func.value) == "sys.path":
                found.append(str(path.relative_to(root)))
                break
    return found


def test_benchmarks_set_the_source_path_in_one_place():
    """Only `_src.py` puts src/ on sys.path (and `studies/_paths.py` makes benchmarks/ importable from studies/);
    every benchmark imports them instead of editing sys.path itself."""
    assert sys_path_edits(BENCHMARKS) == ["_src.py", "studies/_paths.py"]


def test_benchmarks_import_no_test_module():
    """What benchmarks and tests share lives in benchmarks/ (run by the tests as scripts) or in src/."""
    test_modules = {p.stem for p in (SRC.parent / "tests").rglob("*.py")}
    found = []
    for name, path in modules(BENCHMARKS).items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            found += [f"{name} imports {n}" for n in names if n.split(".")[0] in test_modules]
    assert found == []


FORBIDDEN_IN_FORWARD = {"print", "open", "atomic_write", "select_backend", "choose_attention", "write_text",
                        "write_bytes", "measure_backends", "dump", "dumps"}


def test_no_forward_times_writes_or_prints():
    """A model's forward computes only: measuring the attention backends, writing their cache and printing the
    choice happen in the code that runs the model (issue 25)."""
    found = []
    for name, path in modules(SRC).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("forward"):
                for call in ast.walk(node):
                    if isinstance(call, ast.Call):
                        f = call.func
                        called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                        if called.lstrip("_") in FORBIDDEN_IN_FORWARD:
                            found.append(f"{name}.{node.name} calls {called}")
    assert found == []


# Module-level containers in models/ that a function writes, each a cache of a fact that decides no path by itself.
MODULE_CACHES = {
    "kernels._IMPORTED": "the Triton kernel modules once imported (or nothing, without Triton)",
    "kernels.attention._CHOICE": "the measured attention backends by shape, as on disk",
    "kernels.fp8_rows._BIAS_IN_GEMM": "whether this torch build's row-wise FP8 GEMM takes a bias",
    "dual._COMPILED": "the dual block compiled once per inductor backend (which path runs is the caller's choice)",
}
MUTATORS = {"append", "extend", "update", "clear", "pop", "popitem", "setdefault", "insert", "remove", "add"}


def module_state_writes(source: str) -> list[str]:
    """Module-level names that a function of `source` rebinds (`global`) or writes into (item assignment or a
    mutating method): the shape of a process-wide switch."""
    tree = ast.parse(source)
    top = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
           for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    found = set()
    for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(func):
            if isinstance(node, ast.Global):
                found.update(node.names)
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found.update(t.value.id for t in targets
                             if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in MUTATORS and isinstance(node.func.value, ast.Name)):
                found.add(node.func.value.id)
    return sorted(found & top)


def test_the_switch_checker_finds_module_state_a_function_writes():
    source = ("_STATE = {'on': True}\nFLAGS = []\nLOCAL = 1\n\ndef set_on(v):\n    _STATE['on'] = v\n"
              "\ndef add(f):\n    FLAGS.append(f)\n    d = {}\n    d['x'] = 1\n\ndef g():\n    global LOCAL\n")
    assert module_state_writes(source) == ["FLAGS", "LOCAL", "_STATE"]


def test_no_process_wide_switch_decides_the_kernel_path():
    """The kernel path (fused kernels, attention backend, FP8) is the layers' own state, set by
    `precision.prepare` and `forward_mode.plain`: no module in models/ keeps state that a function writes,
    beyond the caches listed above, and none reads an environment variable (issue 25)."""
    root = SRC / "ditkit" / "models"
    found, environ = [], []
    for name, path in modules(root).items():
        text = path.read_text()
        found += [f"{name}.{n}".lstrip(".") for n in module_state_writes(text)]
        environ += [name] if "environ" in text or "getenv" in text else []
    assert sorted(found) == sorted(MODULE_CACHES)
    assert environ == []


# ----------------------------------------------------------------------------------------------- the tests' own shape

TESTS = Path(__file__).resolve().parent


def imported_test_modules(path: Path) -> list[str]:
    """The `test_*` modules that `path` imports anywhere (top level or inside functions)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0].startswith("test_")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0].startswith("test_"):
                found.append(node.module)
    return found


def test_the_checker_finds_an_import_of_a_test_module(tmp_path):
    path = tmp_path / "test_a.py"
    path.write_text("import os\nfrom helpers.models import tiny_dit\n\ndef test_x():\n    from test_b import y\n"
                    "    import test_c.d\n")
    assert imported_test_modules(path) == ["test_b", "test_c.d"]


def test_no_test_module_imports_another():
    """Shared code lives in tests/helpers (fixtures in conftest.py): a test module imports no other test module."""
    found = {path.name: imported_test_modules(path) for path in sorted(TESTS.glob("test_*.py"))}
    assert len(found) > 40  # the walk saw the tests
    assert {name: mods for name, mods in found.items() if mods} == {}


def test_the_subprocess_marker_follows_helpers_and_fixtures(tmp_path):
    from helpers.markers import spawning_functions

    (tmp_path / "test_m.py").write_text(
        "import subprocess, sys\nimport pytest\nfrom helpers.processes import train_script, "
        "assert_sigkill_resume_matches_uninterrupted as kill_and_resume\n\n"
        "def _run(args):\n    return subprocess.run([sys.executable, *args])\n\n"
        "@pytest.fixture\ndef started():\n    return _run(['-c', 'pass'])\n\n"
        "def test_direct():\n    _run(['-V'])\n\n"
        "def test_fixture(started):\n    assert started\n\n"
        "def test_imported(tmp_path):\n    kill_and_resume(tmp_path, train_script(), 4)\n\n"
        "def test_mount():\n    subprocess.run(['mount'])\n\n"
        "def test_script_text_only():\n    assert 'import sys' in train_script()\n")
    tests = {n for n in spawning_functions(tmp_path / "test_m.py") if n.startswith("test_")}
    assert tests == {"test_direct", "test_fixture", "test_imported"}
    real = spawning_functions(TESTS / "test_train.py")
    assert "test_sigkill_then_resume_auto_matches_uninterrupted_run" in real
    assert "test_few_steps_write_checkpoints_and_logs" not in real


# The pipeline's layers, bottom up: a module imports only from its own layer and those below (issue 25). A new
# module goes in the layer of what it does; the longest matching prefix decides.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("ditkit.runtime",)),
    ("recipe", ("ditkit.recipe", "ditkit.models.config", "ditkit.training_methods")),
    ("models", ("ditkit.models",)),
    ("processes", ("ditkit.diffusion", "ditkit.transport", "ditkit.objective", "ditkit.objectives")),
    # counts bounds model sizes (reads DiTConfig); align's projector loads REPA checkpoints through weights/
    ("data and weights", ("ditkit.data", "ditkit.encoders", "ditkit.weights", "ditkit.compat", "ditkit.train.align",
                          "ditkit.runtime.counts")),
    ("stages", ("ditkit.train", "ditkit.sample", "ditkit.metrics", "ditkit.weights.convert")),
    ("apps", ("ditkit.apps", "ditkit.cli", "ditkit.__main__", "ditkit")),
]


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the longest prefix naming `module` (None: in no layer)."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def test_every_module_is_in_a_layer_and_no_import_runs_back_up():
    graph = import_graph(SRC)
    assert [m for m in graph if layer_of(m) is None] == []
    up = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
          for m, targets in sorted(graph.items()) for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert up == []


def test_the_layer_check_finds_an_import_that_runs_back_up():
    assert layer_of("ditkit.models.dit") == 2 and layer_of("ditkit.models.config") == 1
    assert layer_of("ditkit.sample.pipeline") > layer_of("ditkit.objectives") > layer_of("ditkit.models.dit")

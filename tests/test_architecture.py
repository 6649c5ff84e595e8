"""The import rules of docs/architecture.md, read from the source with `ast` (nothing is imported).

- the library (`retrieval/`) imports no stage, orchestrator, benchmark or collection builder;
- a stage (`train`, `encode`, `search`, `eval`) imports no other stage and no orchestrator;
- the collection builders (`corpora/`) import the library only;
- the orchestrators (`experiment/`, `bench/`) import from a stage only its public functions: the
  names in the `__all__` of the stage package or of the module they come from (train: also its two
  stage functions); the report imports no stage;
- the console script (`starbucks_cli/`) names each command's module in its table, and every one exists.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = "retrieval"
STAGES = ("train", "encode", "search", "eval")
ORCHESTRATORS = ("experiment", "bench")
OUTSIDE_THE_LIBRARY = (*STAGES, *ORCHESTRATORS, "corpora", "starbucks_cli")
TRAIN_FUNCTIONS = {"run_training", "run_pretraining"}  # train.finetune / train.pretrain (train has no __all__)


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """`(module, name or None, line)` for every import statement of a file, nested ones included;
    `import a.b` gives ('a.b', None), `from a.b import c` gives ('a.b', 'c')."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # relative: resolve against the file's package
            package = path.relative_to(REPO).parent.parts
            base = ".".join(package[: len(package) - node.level + 1] + ((node.module,) if node.module else ()))
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def top(module: str) -> str:
    return module.split(".", 1)[0]


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO)}:{line}"


def declared_all(path: Path) -> set[str]:
    """The names a module lists in `__all__` (none: empty)."""
    if not path.is_file():
        return set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def stage_public(module: str) -> set[str]:
    """The names a stage offers from `module`: its package's `__all__`, the module's own `__all__`
    (a stage module that declares its public functions), and train's two stage functions."""
    stage = top(module)
    names = declared_all(REPO / stage / "__init__.py") | declared_all(REPO / (module.replace(".", "/") + ".py"))
    return names | (TRAIN_FUNCTIONS if stage == "train" else set())


def test_the_rules_see_imports_of_every_form(tmp_path, monkeypatch):
    """The parser itself: plain, from, nested and relative imports are all found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text(
        "import os.path\nfrom train import finetune\n"
        "def f():\n    from eval.pipeline import evaluate_experiment\n"
        "from . import sibling\nfrom .sub import thing\n"
    )
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert imports(pkg / "mod.py") == [
        ("os.path", None, 1),
        ("train", "finetune", 2),
        ("pkg", "sibling", 5),
        ("pkg.sub", "thing", 6),
        ("eval.pipeline", "evaluate_experiment", 4),
    ]


def test_the_library_imports_no_stage():
    bad = [
        f"{where(p, line)} imports {mod}"
        for p in modules(LIBRARY)
        for mod, _, line in imports(p)
        if top(mod) in OUTSIDE_THE_LIBRARY
    ]
    assert not bad, bad


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another(stage):
    bad = [
        f"{where(p, line)} imports {mod}"
        for p in modules(stage)
        for mod, _, line in imports(p)
        if top(mod) in OUTSIDE_THE_LIBRARY and top(mod) != stage
    ]
    assert not bad, bad


def test_collection_builders_import_the_library_only():
    bad = [
        f"{where(p, line)} imports {mod}"
        for p in modules("corpora")
        for mod, _, line in imports(p)
        if top(mod) in OUTSIDE_THE_LIBRARY and top(mod) != "corpora"
    ]
    assert not bad, bad


@pytest.mark.parametrize("orchestrator", ORCHESTRATORS)
def test_orchestrators_call_only_public_stage_functions(orchestrator):
    bad = []
    for p in modules(orchestrator):
        for mod, name, line in imports(p):
            if top(mod) not in STAGES:
                continue
            if name is None or name not in stage_public(mod):
                bad.append(f"{where(p, line)} imports {mod}.{name or ''} (not in the __all__ of {top(mod)} or {mod})")
    assert not bad, bad


def test_the_report_imports_no_stage():
    """The report reads what eval wrote; it neither evaluates nor drives the stages."""
    bad = [
        f"{where(REPO / 'experiment' / 'report.py', line)} imports {mod}"
        for mod, _, line in imports(REPO / "experiment" / "report.py")
        if top(mod) in (*STAGES, "experiment")
    ]
    assert not bad, bad


def test_experiment_modules_import_no_cycle():
    """pipeline -> report, never back (the report is files in, report out)."""
    graph = {
        p.stem: {mod.split(".")[1] for mod, _, _ in imports(p) if top(mod) == "experiment" and "." in mod}
        for p in modules("experiment")
    }
    assert "pipeline" in graph["__main__"] and "report" in graph["pipeline"]

    def reaches(a: str, b: str, seen: frozenset = frozenset()) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in graph.get(a, ()))

    assert not [m for m in graph if reaches(m, m)]


PACKAGES = (LIBRARY, *STAGES, "experiment", "corpora", "starbucks_cli")


def module_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (function-local imports included; `from a
    import b` names the module `a.b` when that is a module, else `a`)."""
    files = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for package in PACKAGES
        for p in modules(package)
    }

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in files.items():
        targets = {owner(f"{m}.{n}" if n and f"{m}.{n}" in files else m) for m, n, _ in imports(path)}
        graph[mod] = {t for t in targets if t and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: each set of modules that reach one another (more than one module)."""
    reach = {m: set() for m in graph}
    for m in graph:  # depth-first reachability from each module
        stack = list(graph[m])
        while stack:
            n = stack.pop()
            if n not in reach[m]:
                reach[m].add(n)
                stack.extend(graph.get(n, ()))
    circles = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph if m in reach[m]}
    return sorted(sorted(c) for c in circles)


def test_cycles_finds_a_circle_and_nothing_else():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back():
    """No import circle anywhere in the project, function-local imports included (a local import
    hides a circle from the interpreter, not from the reader)."""
    graph = module_graph()
    assert "retrieval.checkpoint" in graph["retrieval.model"]  # the graph sees the imports
    assert not cycles(graph), cycles(graph)


def test_every_console_command_names_an_existing_module():
    from starbucks_cli import COMMANDS

    assert {"train", "encode", "search", "eval", "experiment"} <= set(COMMANDS)
    (table,) = [
        n.value
        for n in ast.parse((REPO / "starbucks_cli" / "__init__.py").read_text()).body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "COMMANDS"
    ]
    assert len(table.keys) == len(COMMANDS), "a command is listed twice in COMMANDS"
    for name, (module, summary) in COMMANDS.items():
        path = REPO / (module.replace(".", "/") + ".py")
        assert path.is_file(), f"starbucks {name}: {module} does not exist"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"{module} has no main"
        assert summary

"""The package's shape: no import cycles (function-level imports included), one owner of the run folder."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "samcache"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: samcache modules it imports}, from every import statement, at any depth in the file."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative: resolve against this module's package
                    package_name = name if path.name == "__init__.py" else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package_name = package_name.rpartition(".")[0]
                    base = f"{package_name}.{node.module}"
                for alias in node.names:
                    # `from samcache import masks` imports the module samcache.data.masks
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "samcache.data.datasets" in graph["samcache.cli"]  # the graph is read at all
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles_hidden_in_functions(tmp_path):
    package = tmp_path / "samcache"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from samcache import b\n")
    (package / "b.py").write_text("def late():\n    from samcache.c import thing\n")
    (package / "c.py").write_text("import samcache.a\nthing = 1\n")
    graph = import_graph(package)
    assert graph["samcache.b"] == {"samcache.c"}
    assert find_cycle(graph) == ["samcache.a", "samcache.b", "samcache.c", "samcache.a"]
    (package / "c.py").write_text("thing = 1\n")
    assert find_cycle(import_graph(package)) == []


STAGE_TWO = ("samcache.train", "samcache.evaluate", "samcache.deploy", "samcache.serve")
FOLDER_ORDER = ("data", "models", "cache", "embed", "train", "evaluate", "deploy", "serve")
"""The stage folders, lowest first: each imports only from the folders before it (and the
top-level foundation modules); `cli.py` sits above them all."""


def test_stage_two_never_imports_stage_one():
    graph = import_graph()
    stage_two = [m for m in graph if m.startswith(STAGE_TWO)]
    assert len(stage_two) > 10  # the folders are there at all
    for module in stage_two:
        assert not any(t.startswith("samcache.embed") for t in _reachable(graph, module) | {module}), module


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""  # "" for the top-level modules


def test_each_stage_folder_imports_only_the_folders_before_it():
    graph = import_graph()
    for module, targets in graph.items():
        folder = _folder(module)
        if folder not in FOLDER_ORDER:
            continue
        for target in targets:
            other = _folder(target)
            if other == "":  # a foundation module: errors, fileio, config, ...
                assert target.split(".")[-1] not in ("cli", "__main__"), f"{module} imports {target}"
                continue
            assert FOLDER_ORDER.index(other) <= FOLDER_ORDER.index(folder), f"{module} imports {target}"
            if folder == "embed":
                assert other != "train", f"stage one imports stage two: {module} -> {target}"


def test_foundation_modules_import_no_stage_folder_but_models_specs():
    graph = import_graph()
    for module, targets in graph.items():
        if _folder(module) or module.split(".")[-1] in ("cli", "__main__", "samcache"):
            continue
        for target in targets:
            assert _folder(target) == "" or target in FOUNDATION_MAY_IMPORT, f"{module} imports {target}"


FOUNDATION_MAY_IMPORT = {"samcache.models.specs", "samcache.data.images"}
"""The torch-free vocabularies the configs are built from: the model types and the
image intensity modes."""


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


RUN_FILES = {"last.pt", "best.pt", "run.json", "metrics.jsonl", "config.yaml", "curves.png"}


def test_only_runs_py_knows_the_run_folder_file_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "runs.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value in RUN_FILES:
                    offenders.append(f"{path.name}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.JoinedStr):  # f"{weights}.pt", f"eval-{split}.json"
                pieces = [v.value for v in node.values if isinstance(v, ast.Constant)]
                if pieces and (pieces[-1] == ".pt" or pieces[0] == "eval-"):
                    offenders.append(f"{path.name}:{node.lineno} f-string {''.join(pieces)!r}")
    assert not offenders, "run folder file names outside runs.py: " + ", ".join(offenders)


def test_readme_lists_every_module_in_dependency_order():
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## Development"):]
    listed = [line.split("|")[1].strip().strip("`") for line in section.splitlines() if line.startswith("| `")]
    graph = import_graph()

    def entry(module: str) -> str:
        return "/".join(module.split(".")[1:]) + ".py"

    modules = {m for m in graph if m.count(".") and not entry(m).endswith(("__main__.py",))
               and not (PACKAGE / entry(m).replace(".py", "") / "__init__.py").exists()}
    assert sorted(listed) == sorted({entry(m) for m in modules}), "README's module table differs from the package"
    assert len(listed) == len(set(listed))
    position = {name: i for i, name in enumerate(listed)}
    for module in modules:
        for target in graph[module]:
            if entry(target) in position:
                assert position[entry(target)] < position[entry(module)], (
                    f"README lists {entry(module)} before {entry(target)}, which it imports")


def test_only_the_family_definitions_ask_which_model_it_is():
    """Nothing outside models/families.py compares a model type or a family's name, keys a mapping
    by one, nor tests a model's class: everything that differs between families is asked of the
    family object."""
    from samcache.models.families import FAMILIES
    from samcache.models.specs import MODEL_TYPES

    names = set(MODEL_TYPES) | {f.name for f in FAMILIES if f.name != "sam"}  # "sam" is also a loss
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() in ("models/families.py", "models/specs.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if any(isinstance(o, ast.Constant) and o.value in names for o in operands):
                    offenders.append(f"{path.name}:{node.lineno} compares with a model type or family name")
                if any(isinstance(o, ast.Attribute) and o.attr == "name" and "family" in ast.unparse(o)
                       for o in operands):
                    offenders.append(f"{path.name}:{node.lineno} compares a family's name")
            if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value in names | {"sam"}
                                                  for k in node.keys):
                offenders.append(f"{path.name}:{node.lineno} keys a mapping by model type or family name")
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Attribute) and (
                    node.slice.attr == "name" and "family" in ast.unparse(node.slice)):
                offenders.append(f"{path.name}:{node.lineno} looks a family's name up")
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
                if "Sam2AsSam" in ast.unparse(node) or "Sam)" in ast.unparse(node):
                    offenders.append(f"{path.name}:{node.lineno} tests the model's class")
    assert not offenders, "; ".join(offenders)

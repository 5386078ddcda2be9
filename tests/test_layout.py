"""The house rules of the package's layout, checked on the source and in fresh processes: layers
that import one way (no cycle, no upward import, inside functions too), one home per concern,
a test file per module, and a layout in the docs (docs/internals.md) that names every module."""

import ast
import json
import re
import subprocess
import sys
import typing
from collections import defaultdict
from pathlib import Path

import pytest
from support import PACKAGE, ROOT, TESTS

from convnext_cifar import config
from convnext_cifar.data.kinds import DATASETS

# Lowest first: a module imports only from its own layer or those below it, whether at the top
# of the file or inside a function. Within a layer the imports must not form a cycle either.
LAYERS = [
    ("ground", {"convnext_cifar", "errors", "files", "terminal", "network", "metrics",
                "distributed", "runtime"}),
    ("data", {"data"}),  # a folder: every module in it
    ("config", {"config", "presets"}),
    ("model", {"model"}),
    ("use", {"use"}),
    ("outputs", {"outputs"}),
    ("training", {"training"}),
    ("tune", {"tune"}),
    ("cli", {"cli", "cli_errors", "__main__"}),
]
# Imports of the package inside functions keep the command line torch-free: `cli` imports each
# command's modules when it runs; data/kinds.py (which config.py reads) imports the readers
# that need torch when a dataset is loaded. Nowhere else.
LAZY_IMPORTERS = {"cli", "data.kinds"}


def module_name(path: Path) -> str:
    """convnext_cifar/data/kinds.py -> data.kinds; the package's __init__.py -> convnext_cifar."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "convnext_cifar"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for rank, (_, members) in enumerate(LAYERS):
        if module in members or top in members:
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def imported_modules(node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement imports (a name that is a module counts as it)."""
    if isinstance(node, ast.Import):
        return [a.name.removeprefix("convnext_cifar.") for a in node.names
                if a.name.startswith("convnext_cifar.")]
    if not node.module or not node.module.startswith("convnext_cifar"):
        return []
    base = node.module.removeprefix("convnext_cifar").lstrip(".")
    found = []
    for alias in node.names:
        inner = f"{base}.{alias.name}" if base else alias.name
        found.append(inner if inner in MODULES else base or "convnext_cifar")
    return found


def imports_of(path: Path) -> dict[str, list[tuple[str, int]]]:
    """{'top': [...], 'function': [...], 'typing': [...]}: (module, line) of every package import,
    by where it is: at module level, inside a function, under `if TYPE_CHECKING:`."""
    found: dict[str, list[tuple[str, int]]] = defaultdict(list)

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = "function"
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                inner = "typing"
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found[inner] += [(m, child.lineno) for m in imported_modules(child)]
            visit(child, inner)

    visit(ast.parse(path.read_text()), "top")
    return found


IMPORTS = {name: imports_of(path) for name, path in MODULES.items()}


def test_every_import_goes_to_the_same_layer_or_below_also_inside_functions():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {target} ({LAYERS[layer_of(target)][0]}) "
              f"at line {line}"
              for m, found in IMPORTS.items() for where in ("top", "function")
              for target, line in found[where] if layer_of(target) > layer_of(m)]
    assert upward == []


def test_the_imports_form_no_cycle_also_inside_functions():
    graph = {m: {t for where in ("top", "function") for t, _ in found[where] if t != m}
             for m, found in IMPORTS.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [module, target]))
            elif target not in state:
                walk(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [])
    assert cycles == []


def test_the_layout_check_sees_an_upward_import_inside_a_function(tmp_path):
    """The checks above would catch what they are for: an import hidden in a function."""
    source = tmp_path / "sneaky.py"
    source.write_text("def f():\n    from convnext_cifar.training.loop import fit\n")
    found = imports_of(source)
    assert found["function"] == [("training.loop", 2)] and found["top"] == []
    assert layer_of("training.loop") > layer_of("data.kinds")


def test_only_the_torch_free_command_line_imports_the_package_inside_functions():
    lazy = sorted(m for m, found in IMPORTS.items() if found["function"])
    assert set(lazy) <= LAZY_IMPORTERS, lazy


def test_typing_only_imports_that_go_up_a_layer_name_config_types_only():
    """data/ and runtime.py annotate with config.py's sections, which config.py builds on
    data/kinds.py's registry: those names are for the type checker, never imported."""
    wrong = [f"{m} line {line}: {target}" for m, found in IMPORTS.items()
             for target, line in found["typing"]
             if layer_of(target) > layer_of(m) and target != "config"]
    assert wrong == []


def test_every_folder_says_what_lives_there_in_its_init():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split(". ")) == 1, init


def test_no_function_is_longer_than_55_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 55:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def test_every_module_has_its_test_file():
    """tests/ follows the package: convnext_cifar/data/cache.py -> tests/data/test_cache.py."""
    missing = []
    for path in MODULES.values():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        rel = path.relative_to(PACKAGE)
        if not (TESTS / rel.parent / f"test_{rel.name}").exists():
            missing.append(str(rel))
    assert missing == []


def test_no_test_file_imports_another():
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n.split(".")[-1].startswith(("test_", "conftest")) for n in names):
                found.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert found == []


def test_the_docs_layout_names_every_module():
    text = (ROOT / "docs" / "internals.md").read_text()
    section = text[text.index("## Layout"):]
    section = section[:section.index("\n## ", 1)]
    missing = [str(p.relative_to(PACKAGE)) for p in MODULES.values()
               if p.name != "__init__.py" and not re.search(
                   rf"(?<![\w/]){re.escape(p.name)}(?![\w.])", section)]
    folders = [d.name + "/" for d in PACKAGE.iterdir() if (d / "__init__.py").exists()]
    missing += [f for f in folders if f not in section]
    assert missing == []


def _modules_loaded_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_using_a_model_never_imports_the_trainer():
    loaded = _modules_loaded_by("import convnext_cifar.use.predict, convnext_cifar.use.export, "
                                "convnext_cifar.use.evaluate, benchmarks.decode")
    assert "convnext_cifar.use.evaluate" in loaded
    assert not {m for m in loaded if m.startswith("convnext_cifar.training")}


def test_the_command_line_modules_do_not_import_torch():
    loaded = _modules_loaded_by("import convnext_cifar.cli, convnext_cifar.presets")
    assert "convnext_cifar.data.kinds" in loaded and "torch" not in loaded


def test_only_kinds_py_knows_the_dataset_names():
    names = set(DATASETS)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "data" / "kinds.py":  # the registry itself
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                if any(isinstance(p, ast.Constant) and p.value in names for p in parts) or any(
                        isinstance(p, ast.Attribute) and p.attr == "dataset" for p in parts):
                    found.append(f"{path.name}:{node.lineno}")
    assert found == []
    # --data.dataset takes exactly the registry's names
    hints = typing.get_type_hints(config.DataConfig)
    assert typing.get_args(hints["dataset"]) == tuple(DATASETS)


@pytest.mark.parametrize("module", ["config", "presets"])
def test_presets_state_only_what_they_change(module):
    """Field docstrings live once, in config.py; presets.py repeats none of them."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    repeated = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body[1:] if ast.get_docstring(cls) else cls.body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(
                    b.value, ast.Constant) and isinstance(b.value.value, str):
                repeated.append(f"{cls.name}.{a.target.id}")
    if module == "presets":
        assert repeated == []
    else:
        assert "DataConfig.dataset" in repeated  # config.py does document its fields

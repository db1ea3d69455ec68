"""The package's layers import one way only (docs/ARCHITECTURE.md), with no import cycle.

Reads every module's imports from its source (``ast``, nothing is executed), so a lazy import inside a
function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_s2"
# Bottom to top: a layer may import its own modules and the layers before it.
LAYERS = ("ops", "core", "training", "hf", "eval")
# Third-party packages a layer may not import (even lazily), on top of the layer rule.
FORBIDDEN_THIRD_PARTY = {"ops": ("megatron", "transformers", "yaml"), "core": ("megatron.training", "transformers")}
ENTRY_POINTS = ["pretrain_gpt_s2.py", *sorted(p.relative_to(ROOT).as_posix() for d in ("tools", "examples")
                                               for p in (ROOT / d).glob("*.py"))]


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: pathlib.Path, root: pathlib.Path = ROOT) -> set[str]:
    """Absolute names of every module ``path`` imports (``from a import b`` counts ``a.b`` when that
    is a module of the package, else ``a``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                candidate_path = root / candidate.replace(".", "/")
                is_module = candidate_path.with_suffix(".py").exists() or (candidate_path / "__init__.py").exists()
                found.add(candidate if is_module else base)
    return found


def layer_of(module: str):
    parts = module.split(".")
    if parts[0] != "megatron_s2" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


PACKAGE_MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_package_module_belongs_to_a_layer():
    stray = [m for m in PACKAGE_MODULES if m != "megatron_s2" and layer_of(m) is None]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


@pytest.mark.parametrize("module", sorted(PACKAGE_MODULES))
def test_no_upward_import(module):
    layer = layer_of(module)
    if layer is None:  # the package's __init__: re-exports the ops layer's public names
        allowed = {"ops"}
    else:
        allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    for target in imported_modules(PACKAGE_MODULES[module]):
        if target == "megatron_s2":
            assert layer is not None and layer != "ops", f"{module} imports the package root (a cycle through it)"
            continue
        if target.startswith("megatron_s2."):
            assert layer_of(target) in allowed, f"{module} ({layer}) imports {target} from a higher layer"
        for forbidden in FORBIDDEN_THIRD_PARTY.get(layer, ()):
            assert not (target == forbidden or target.startswith(forbidden + ".")), \
                f"{module} ({layer} layer) imports {target}"


def find_cycle(graph: dict):
    """One import cycle of ``{module: modules it imports}`` as a list ending where it starts, or None."""
    done, on_path = set(), []

    def visit(module):
        if module in on_path:
            return on_path[on_path.index(module):] + [module]
        if module in done:
            return None
        on_path.append(module)
        for target in sorted(graph.get(module, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        on_path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_no_import_cycle():
    graph = {m: {t for t in imported_modules(p) if t in PACKAGE_MODULES and t != m}
             for m, p in PACKAGE_MODULES.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_entry_points_import_the_package_only(script):
    path = ROOT / script
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top not in ("pretrain_gpt_s2", "tools", "examples", "tests"), f"{script} imports {name}"


def _edits_sys_path(tree) -> bool:
    """Whether the code calls a method of ``sys.path`` or assigns to it."""
    def is_sys_path(node):
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value):
            return True
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)) for t in targets):
                return True
    return False


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for d in ("megatron_s2", "tools", "examples", "tests")
                                        for p in (ROOT / d).rglob("*.py")) + ["pretrain_gpt_s2.py"])
def test_no_sys_path_edits(path):
    """Imports work through the installed package (pip install -e .) or pytest's pythonpath setting."""
    assert not _edits_sys_path(ast.parse((ROOT / path).read_text())), f"{path} edits sys.path"


def test_the_sys_path_check_sees_an_edit():
    assert _edits_sys_path(ast.parse("import sys\nsys.path.insert(0, 'x')\n"))
    assert _edits_sys_path(ast.parse("import sys\nsys.path[:0] = ['x']\n"))
    assert not _edits_sys_path(ast.parse("import sys\nprint(sys.path)\n"))


def test_the_checker_sees_lazy_relative_imports_and_cycles(tmp_path):
    """The checker itself: a lazy relative import of a higher layer, and a two-module cycle."""
    fake = tmp_path / "megatron_s2"
    for layer in ("ops", "core"):
        (fake / layer).mkdir(parents=True)
        (fake / layer / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "ops" / "a.py").write_text("def f():\n    from ..core import b\n")
    (fake / "core" / "b.py").write_text("from . import c\n")
    (fake / "core" / "c.py").write_text("from .b import x\n")
    assert imported_modules(fake / "ops" / "a.py", tmp_path) == {"megatron_s2.core.b"}
    assert layer_of("megatron_s2.core.b") == "core"
    graph = {module_name(p, tmp_path): imported_modules(p, tmp_path) for p in fake.rglob("*.py")}
    assert find_cycle(graph) == ["megatron_s2.core.b", "megatron_s2.core.c", "megatron_s2.core.b"]

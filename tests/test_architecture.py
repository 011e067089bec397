"""The package layout is the architecture: imports point only downwards, components share no privates.

Each unit (a top-level module or a subsystem folder of ``agent/``) has a layer. A module may import its own
unit and units of lower layers; units on the same layer (the adapters) never import each other. Lazy
imports inside functions and ``TYPE_CHECKING`` imports count too: a cycle hidden in a function is still a
cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "agent"
# Lowest first. The README's code map describes each unit.
LAYERS: list[set[str]] = [
    {"agent", "agent.compat", "agent.errors", "agent.faults"},
    {"agent.periodic"},
    {"agent.profiles", "agent.config_resources"},
    {"agent.config"},
    {"agent.config_loader"},
    {"agent.exchange"},
    {"agent.signing", "agent.mqtt", "agent.observe"},
    {"agent.models", "agent.upstream"},
    {"agent.serving", "agent.deploy", "agent.status"},
    {"agent.monitoring"},
    {"agent.app"},
    {"agent.tools"},
    {"agent.cli"},
    {"agent.__main__"},
]
LAYER_OF = {unit: index for index, layer in enumerate(LAYERS) for unit in layer}
# Names with a leading underscore that are a library's public API, not another component's privates.
LIBRARY_PRIVATE_API = {"_meta"}  # Peewee's model metadata


def _modules() -> list[tuple[str, Path]]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.append((".".join(parts), path))
    return modules


def unit_of(module: str) -> str:
    """The layered unit a dotted module name belongs to (``agent.serving.pipeline`` -> ``agent.serving``)."""
    parts = module.split(".")
    if parts[0] != "agent":
        raise ValueError(module)
    return ".".join(parts[:2])


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # "from agent import topics" imports the submodule agent.topics
            found.extend((node.lineno, f"{name}.{alias.name}") for alias in node.names if name == "agent")
    return [(line, name) for line, name in found if name == "agent" or name.startswith("agent.")]


def import_violations() -> list[str]:
    """Every import that points sideways or upwards, as 'file:line: a -> b'."""
    violations = []
    for module, path in _modules():
        unit = unit_of(module)
        assert unit in LAYER_OF, f"{unit} has no layer in tests/test_architecture.py: add it"
        tree = ast.parse(path.read_text(), str(path))
        for line, imported in _imported_modules(tree, module, path.name == "__init__.py"):
            target = unit_of(imported) if imported != "agent" else "agent"
            if target == unit or target not in LAYER_OF:
                continue
            if LAYER_OF[target] >= LAYER_OF[unit]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {unit} -> {target}")
    return violations


def test_every_import_points_down_a_layer() -> None:
    assert import_violations() == []


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    tree = ast.parse("from agent.serving.pipeline import Delivery\nfrom agent import app\n")
    imported = [name for _, name in _imported_modules(tree, "agent.mqtt.local_link", False)]
    assert [unit_of(name) for name in imported] == ["agent.serving", "agent", "agent.app"]
    assert all(LAYER_OF[unit_of(name)] > LAYER_OF["agent.mqtt"] for name in imported if name != "agent")


def test_no_class_is_a_mixin() -> None:
    for _, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(base) for base in node.bases]
                assert not node.name.endswith("Mixin") and not any(b.endswith("Mixin") for b in bases), (
                    f"{path.name}: {node.name}({', '.join(bases)})"
                )


def _private_names_defined(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


@pytest.mark.parametrize("module,path", _modules(), ids=lambda value: value if isinstance(value, str) else "")
def test_no_module_reaches_into_another_components_privates(module: str, path: Path) -> None:
    tree = ast.parse(path.read_text())
    own = _private_names_defined(tree)
    reached = [
        f"{path.name}:{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        and node.attr not in own
        and node.attr not in LIBRARY_PRIVATE_API
    ]
    assert reached == []

"""DESIGN.md's layer order, checked from the imports of every module (function-level ones too).

cli -> tasks -> evaluation/training -> pipelines -> factory -> models (vision, multimodal) ->
layers -> kernels; weights, datasets, metrics, viz, errors, registry and the private helpers are
leaves that import none of those. Imports under ``if TYPE_CHECKING:`` are not dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "attnzoo"

#: Higher imports lower, never the other way; equal ranks do not import each other unless they are one package.
RANKS = {
    "cli": 8,
    "demo": 7,
    "tasks": 6,
    "evaluation": 5,
    "training": 5,
    "pipelines": 4,
    "factory": 3,
    "vision": 2,
    "multimodal": 2,
    "vision.layers": 1,
    "kernels": 0,
}
LEAVES = {"weights", "datasets", "metrics", "viz", "errors", "registry", "_io", "_distributed", "_placement", "_values"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    """The layer a module belongs to: ``attnzoo.vision.layers.x`` -> ``vision.layers``, ``attnzoo.vision.oat`` -> ``vision``."""
    parts = module.split(".")[1:]
    if not parts:
        return ""
    if parts[:2] == ["vision", "layers"]:
        return "vision.layers"
    return parts[0]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("attnzoo"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("attnzoo"):
                found.add(base)
                found.update(
                    f"{base}.{a.name}"
                    for a in node.names
                    if (SRC.parent / f"{base}.{a.name}".replace(".", "/")).exists()
                    or (SRC.parent / (f"{base}.{a.name}".replace(".", "/") + ".py")).exists()
                )
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("attnzoo"):
                found.add(node.args[0].value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _edges() -> list[tuple[str, str]]:
    edges = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        edges += [(module, target) for target in _imports(path, module)]
    return edges


def _violation(source: str, target: str) -> str | None:
    a, b = _unit(source), _unit(target)
    if not a or not b or a == b:  # the package root is the lazy facade; a layer may import itself
        return None
    if a in LEAVES:
        return None if b in LEAVES else f"{source} (a leaf) imports {target}"
    if b in LEAVES:
        return None
    if RANKS[a] <= RANKS[b]:
        return f"{source} ({a}) imports {target} ({b}): dependencies point down only"
    return None


def test_every_module_has_a_layer():
    units = {_unit(_module_name(p)) for p in SRC.rglob("*.py")} - {""}
    assert units <= set(RANKS) | LEAVES, f"modules outside the layer map: {sorted(units - set(RANKS) - LEAVES)}"


def test_imports_follow_the_layer_order():
    violations = sorted({v for s, t in _edges() if (v := _violation(s, t))})
    assert not violations, "\n".join(violations)


def test_datasets_import_no_model_code():
    bad = sorted({f"{s} -> {t}" for s, t in _edges() if _unit(s) == "datasets" and _unit(t) not in LEAVES})
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("source", "target", "ok"),
    [
        ("attnzoo.cli", "attnzoo.tasks", True),
        ("attnzoo.tasks", "attnzoo.cli", False),
        ("attnzoo.training.reconstruction", "attnzoo.evaluation.reconstruction", False),
        ("attnzoo.datasets.wsi", "attnzoo.factory", False),
        ("attnzoo.vision.oat", "attnzoo.factory", False),
        ("attnzoo.vision.oat", "attnzoo.registry", True),
        ("attnzoo.vision.layers.x", "attnzoo.vision.biformer", False),
        ("attnzoo.kernels.ops", "attnzoo.errors", True),
    ],
)
def test_the_rule_itself(source, target, ok):
    assert (_violation(source, target) is None) is ok

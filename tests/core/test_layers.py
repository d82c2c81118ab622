"""The package's layers import one way: command lines -> bench -> meta -> tasks -> the shipped core.

Every ``import``/``from ... import`` in the package (lazy ones inside functions included) is read with
:mod:`ast` and resolved to a ``learned_optim`` module; a module may import only from its own layer or
the layers below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import learned_optim

ROOT = Path(learned_optim.__file__).parent
#: Layer of each top-level subpackage or module (higher may import lower, never the reverse).
LAYERS = {"__main__": 4, "bench": 3, "meta": 2, "tasks": 1}  # everything else: 0, the shipped core


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every learned_optim import in ``path``."""
    module = ".".join(("learned_optim", *path.relative_to(ROOT).with_suffix("").parts))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("learned_optim")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("learned_optim"):
                names = [f"{target}.{a.name}" for a in node.names] if target == "learned_optim" else [target]
                found += [(node.lineno, n) for n in names]
    return found


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_the_layers(path):
    module = ".".join(("learned_optim", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
    upward = [(line, target) for line, target in imports_of(path) if layer(target) > layer(module)]
    assert not upward, f"{module} (layer {layer(module)}) imports a higher layer: {upward}"


def test_the_checker_sees_relative_and_lazy_imports():
    tree = ROOT / "adapt.py"
    assert any(t == "learned_optim.functional" for _, t in imports_of(tree))
    assert layer("learned_optim.bench.evaluate") == 3 and layer("learned_optim.tasks.data") == 1
    assert layer("learned_optim.optimizer") == 0 and layer("learned_optim.__main__") == 4

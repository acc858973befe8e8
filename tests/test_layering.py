"""The import layers: ``common/`` at the bottom, ``server/`` and ``client/`` beside each other
on top of it, ``simulations/`` over everything.

Every ``import`` and ``from ... import`` anywhere in a module counts: at the top, inside
functions, under ``if TYPE_CHECKING:``. Relative imports are resolved against the module's
package. A lazy import inside a function still couples the layers, so it is no excuse.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN: dict[str, frozenset[str]] = {
    "common": frozenset({"server", "client", "simulations"}),
    "server": frozenset({"client", "simulations"}),
    "client": frozenset({"server", "simulations"}),
    "simulations": frozenset(),
}
"""Top-level package -> the packages its modules must not import."""


def _module_name(path: Path) -> str:
    """``server/deploy/cli.py`` -> ``server.deploy.cli``; ``server/deploy/__init__.py`` ->
    ``server.deploy``."""
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """Each ``(line, absolute module name)`` that ``tree`` imports, anywhere in it."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                up = node.level - 1
                if up >= len(package):
                    yield node.lineno, node.module or ""  # beyond the top: Python refuses it
                    continue
                base = ".".join([*package[: len(package) - up], *filter(None, [node.module])])
            if node.module is None:  # from . import a, b: a and b are modules of the package
                for alias in node.names:
                    yield node.lineno, f"{base}.{alias.name}"
            else:
                yield node.lineno, base


def violations(source: str, path: Path) -> list[str]:
    """``"FILE:LINE: LAYER imports MODULE"`` for each import of ``source`` (the text of
    ``path``, relative to the repository root) that its layer forbids."""
    layer = path.parts[0]
    forbidden = FORBIDDEN[layer]
    tree = ast.parse(source, filename=str(path))
    return [
        f"{path}:{line}: {layer}/ imports {name}"
        for line, name in _imported(tree, _module_name(path), path.name == "__init__.py")
        if name.split(".")[0] in forbidden
    ]


def _modules(layer: str) -> list[Path]:
    return sorted(p.relative_to(ROOT) for p in (ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_lies_below(layer: str) -> None:
    # Prepare
    modules = _modules(layer)
    assert modules, f"no modules under {ROOT / layer}"

    # Execute
    found = [v for path in modules for v in violations((ROOT / path).read_text(), path)]

    # Assert
    assert not found, "imports across the layers:\n" + "\n".join(found)


# --------------------------------------------------------------- the checker finds violations

LAZY_SERVER = """
def helper() -> None:
    from server.x import y
"""
TYPE_ONLY_CLIENT = """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import client.app as app
"""
IN_METHOD = """
class A:
    def f(self) -> None:
        import simulations.runner, json
"""


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("common/a.py", LAZY_SERVER, ["common/a.py:3: common/ imports server.x"]),
        ("client/b.py", LAZY_SERVER, ["client/b.py:3: client/ imports server.x"]),
        ("server/c.py", TYPE_ONLY_CLIENT, ["server/c.py:4: server/ imports client.app"]),
        ("server/c.py", IN_METHOD, ["server/c.py:4: server/ imports simulations.runner"]),
        ("common/d/e.py", "from ...server import x\n", ["common/d/e.py:1: common/ imports server"]),
        ("simulations/f.py", LAZY_SERVER + TYPE_ONLY_CLIENT + IN_METHOD, []),
        ("server/g.py", "from common.cli import out\nfrom . import dp\n", []),
        ("server/d/e.py", "from ..client_ids import x\n", []),
        ("common/h.py", "import serverless\nfrom .client_side import z\n", []),
    ],
)
def test_checker_reports_file_and_line(path: str, source: str, expected: list[str]) -> None:
    assert violations(source, Path(path)) == expected

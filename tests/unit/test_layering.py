"""Import rules between the layers (DESIGN.md "The shape"), checked on the source with ast.

- ``anim/`` is the archive and knows no network: no pynetdicom, aiohttp, scp or web.
  ``anim/cli.py`` is the composition root that wires them together, so it is exempt.
- ``scp/`` and ``web/`` are edges: they never import each other, and they reach the
  index only through ``anim`` (no SQLAlchemy, no ``anim.index``).

Imports inside functions, relative imports and ``importlib.import_module("...")`` /
``__import__("...")`` with a literal name all count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

RULES: dict[str, tuple[str, ...]] = {
    "anim": ("pynetdicom", "aiohttp", "scp", "web"),
    "scp": ("web", "sqlalchemy", "anim.index"),
    "web": ("scp", "sqlalchemy", "anim.index"),
}
EXEMPT = {Path("anim/cli.py")}


def _module_of(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of ``from <level dots><module> import ...`` in *current*."""
    if level == 0:
        return module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, module] if module else base)


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module name the source may import (``from a import b`` gives a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            names.add(base)
            names.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if fname in ("import_module", "__import__") and isinstance(arg, ast.Constant) \
                    and isinstance(arg.value, str):
                names.add(arg.value)
    return names


def violations(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names for f in forbidden if n == f or n.startswith(f + "."))


def layer_files(layer: str) -> list[Path]:
    return sorted(p.relative_to(ROOT) for p in (ROOT / layer).rglob("*.py")
                  if p.relative_to(ROOT) not in EXEMPT)


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    files = layer_files(layer)
    assert files, f"no Python files under {layer}/"
    found: dict[str, list[str]] = {}
    for rel in files:
        source = (ROOT / rel).read_text(encoding="utf-8")
        names = imported_names(source, _module_of(rel), rel.name == "__init__.py")
        bad = violations(names, RULES[layer])
        if bad:
            found[str(rel)] = bad
    assert found == {}, f"{layer}/ must not import {RULES[layer]}"


def test_cli_is_the_only_exemption() -> None:
    assert all((ROOT / p).is_file() for p in EXEMPT), "an exempt file no longer exists"
    assert {p.parts[0] for p in EXEMPT} == {"anim"}


@pytest.mark.parametrize(("source", "module", "forbidden", "expected"), [
    ("import pynetdicom", "anim.archive", ("pynetdicom",), ["pynetdicom"]),
    ("def f():\n    from pynetdicom.sop_class import Verification",
     "anim.archive", ("pynetdicom",),
     ["pynetdicom.sop_class", "pynetdicom.sop_class.Verification"]),
    ("from .. import web", "anim.index.repo", ("web",), []),  # that is anim.web, not web
    ("from ... import web", "anim.index.repo", ("web",), ["web"]),
    ("from . import routes", "scp.handlers", ("scp",), ["scp", "scp.routes"]),
    ("from anim import index", "web.health", ("anim.index",), ["anim.index"]),
    ("from anim.index.repo import Index", "web.qido", ("anim.index",),
     ["anim.index.repo", "anim.index.repo.Index"]),
    ("import importlib\nimportlib.import_module('sqlalchemy.orm')", "scp.server",
     ("sqlalchemy",), ["sqlalchemy.orm"]),
    ("__import__('aiohttp')", "anim.storage", ("aiohttp",), ["aiohttp"]),
    ("from aiohttp import web", "web.app", ("web",), []),  # aiohttp.web is not our web/
    ("from anim import Archive\nimport anim", "web.app", ("anim.index",), []),
])
def test_checker_sees_every_form_of_import(source: str, module: str,
                                           forbidden: tuple[str, ...],
                                           expected: list[str]) -> None:
    assert violations(imported_names(source, module), forbidden) == expected

"""What the code imports is what the package declares (issue 23): a newcomer's core install
(`pip install torch==2.13.0 -e .`) must run everything that does not name an extra.

Every import under ``src/`` is read with ``ast``; third-party top-level modules are mapped to the
distributions that provide them (``importlib.metadata.packages_distributions()``) and checked against
``pyproject.toml``:
* a module imported at a module's top level, or in a function without going through
  ``captionlens.extras.require``, must come from a core dependency;
* ``require("module", "extra")`` must name an extra that declares the module's distribution.
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pkgutil
import re
import sys
import tomllib
from pathlib import Path

import pytest

import captionlens
from captionlens.extras import EXTRAS, MissingExtra, require

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "captionlens"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0])


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """The core dependencies and each extra's, as normalised distribution names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {name: {_requirement_name(r) for r in requirements}
              for name, requirements in project.get("optional-dependencies", {}).items()}
    return core, extras


class Imports(ast.NodeVisitor):
    """Third-party top-level modules a file imports: at module level, inside functions, and through
    ``require("module", "extra")``."""

    def __init__(self) -> None:
        self.top_level: set[str] = set()
        self.in_functions: set[str] = set()
        self.required: set[tuple[str, str]] = set()
        self.depth = 0

    def _add(self, module: str) -> None:
        (self.in_functions if self.depth else self.top_level).add(module.split(".")[0])

    def visit_FunctionDef(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node.module)

    def visit_Call(self, node: ast.Call) -> None:
        if (isinstance(node.func, ast.Name) and node.func.id == "require" and len(node.args) == 2
                and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args)):
            self.required.add((node.args[0].value.split(".")[0], node.args[1].value))
        self.generic_visit(node)


def third_party(module: str) -> bool:
    return module not in sys.stdlib_module_names and module not in ("captionlens", "__future__")


def source_files() -> list[Path]:
    return sorted(SOURCE.rglob("*.py"))


def test_every_import_under_src_is_declared():
    core, extras = declared()
    providers = {module: {_normalise(d) for d in dists}
                 for module, dists in importlib.metadata.packages_distributions().items()}
    problems = []
    for path in source_files():
        imports = Imports()
        imports.visit(ast.parse(path.read_text(), str(path)))
        name = path.relative_to(ROOT)
        required_modules = {module for module, _ in imports.required}
        for module in sorted(m for m in imports.top_level | imports.in_functions if third_party(m)):
            dists = providers.get(module)
            if not dists:
                problems.append(f"{name}: imports '{module}', which no installed distribution provides")
            elif not dists & core and module not in required_modules:
                where = "at its top level" if module in imports.top_level else "without captionlens.extras.require"
                problems.append(f"{name}: imports '{module}' ({', '.join(sorted(dists))}) {where}, but it is not "
                                "a core dependency in pyproject.toml")
            elif module in imports.top_level and not dists & core:
                problems.append(f"{name}: imports the optional '{module}' at its top level")
        for module, extra in sorted(imports.required):
            dists = providers.get(module, set())
            if extra not in extras or not dists & extras[extra]:
                problems.append(f"{name}: require({module!r}, {extra!r}) but the extra {extra!r} does not declare "
                                f"{' or '.join(sorted(dists)) or module}")
    assert not problems, "\n".join(problems)


def test_the_import_checker_catches_an_undeclared_import():
    """The checker itself: a module importing scikit-image (as sanity.py once did) is caught."""
    imports = Imports()
    imports.visit(ast.parse("def ssim(a, b):\n    from skimage.metrics import structural_similarity\n"))
    core, _ = declared()
    dists = {_normalise(d) for d in importlib.metadata.packages_distributions()["skimage"]}
    assert imports.in_functions == {"skimage"} and not dists & core


def test_every_extra_the_code_names_is_declared():
    _, extras = declared()
    assert set(EXTRAS) <= set(extras)


def test_every_submodule_imports():
    """The core install's promise, in this environment: every module of the package imports."""
    names = [m.name for m in pkgutil.walk_packages(captionlens.__path__, "captionlens.")
             if m.name != "captionlens.__main__"]  # runs the CLI
    assert len(names) > 50
    for name in names:
        importlib.import_module(name)


def test_a_missing_extra_names_the_extra_to_install():
    with pytest.raises(MissingExtra, match=r"pip install 'captionlens\[viewer\]'"):
        require("a_module_nobody_installed", "viewer")
    with pytest.raises(ValueError, match="unknown extra"):
        require("json", "nonsense")


# The layers of the package, lowest first: a module may import its own layer and those below it.
LAYERS = [("errors",), ("extras", "io"), ("distributed", "data"), ("models", "train"), ("explain", "display", "features", "pipeline"),
          ("experiments",), ("report",), ("viewer",), ("api", "demo"), ("cli", "__init__", "__main__")]


def test_data_flows_one_way():
    """data → models → explain → experiments → report/viewer → api/cli: nothing lower imports anything
    higher (at any depth, lazily or not)."""
    level = {name: k for k, names in enumerate(LAYERS) for name in names}
    upward = []
    for path in source_files():
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        here = parts[0]
        package = parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = (base + (node.module.split(".") if node.module else []))[:1] or ["__init__"]
                if target[0] != here and level[target[0]] > level[here]:
                    upward.append(f"{path.relative_to(ROOT)} imports {'.' * node.level}{node.module or ''}")
    assert set(level) >= {p.stem if p.is_file() else p.name for p in SOURCE.iterdir()
                          if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())}
    assert not upward, "\n".join(upward)

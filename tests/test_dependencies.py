"""Every third-party package the code imports is declared in setup.py.

CI's test venv has the `test` extra (torch, which brings jinja2, sympy, ...), so a runtime dependency missing
from `install_requires` hides there and breaks only a user's plain `pip install -e .`. This audit reads the
imports with `ast`, maps each top-level module to the distributions that provide it, and compares with
setup.py as written (no reinstall needed):
- a module-level import in the package or the commands must be in `install_requires`;
- an import inside a function (an optional path, e.g. `bench_generate --hf`) may also be in an extra;
- an import in tests/ may be in `install_requires` or the `test` extra.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_DIRS = ("rosa2_jax", "kernels", "experiments")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0))


def declared(setup_py: Path = ROOT / "setup.py") -> tuple[set[str], dict[str, set[str]]]:
    """(install_requires, extras_require) of the setup() call, as canonical distribution names."""
    call = next(node for node in ast.walk(ast.parse(setup_py.read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords
                if k.arg in ("install_requires", "extras_require")}
    runtime = {_requirement_name(r) for r in keywords.get("install_requires", [])}
    extras = {extra: {_requirement_name(r) for r in reqs} for extra, reqs in keywords.get("extras_require", {}).items()}
    return runtime, extras


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, at module level) of every absolute import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(child) for child in ast.walk(node) if child is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name.split(".")[0], node.lineno, id(node) not in in_function) for name in names]
    return found


def undeclared(files: list[Path], allowed_at_module: set[str], allowed_in_function: set[str],
               first_party: set[str]) -> list[str]:
    """One line per third-party import that no allowed distribution provides."""
    providers = importlib.metadata.packages_distributions()
    problems = []
    for path in files:
        for module, line, module_level in imports(path):
            if module in first_party or module in sys.stdlib_module_names or module == "__future__":
                continue
            allowed = allowed_at_module if module_level else allowed_in_function
            dists = {_canonical(d) for d in providers.get(module, [])}
            if not dists & allowed:
                where = f"{path.relative_to(ROOT)}:{line}"
                provided = f"provided by {', '.join(sorted(dists))}" if dists else "not installed here"
                problems.append(f"{where}: `import {module}` ({provided}) is not declared where it must be")
    return problems


def _python_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


FIRST_PARTY = {"rosa2_jax", "experiments", "kernels"} | {p.stem for p in (ROOT / "tests").glob("*.py")}


def test_runtime_imports_are_install_requires():
    runtime, extras = declared()
    any_extra = set().union(*extras.values())
    problems = undeclared(_python_files(*RUNTIME_DIRS), runtime, runtime | any_extra, FIRST_PARTY)
    assert not problems, "add these to install_requires in setup.py:\n" + "\n".join(problems)


def test_test_imports_are_declared():
    runtime, extras = declared()
    allowed = runtime | extras.get("test", set())
    problems = undeclared(_python_files("tests"), allowed, allowed, FIRST_PARTY)
    assert not problems, "add these to the `test` extra in setup.py:\n" + "\n".join(problems)


def test_the_audit_catches_a_missing_dependency(tmp_path):
    """The audit is not vacuous: setup.py without numpy fails it, and lazy imports are held to the extras."""
    setup_py = tmp_path / "setup.py"
    setup_py.write_text((ROOT / "setup.py").read_text().replace('"numpy>=1.26,<3",', ""))
    runtime, extras = declared(setup_py)
    assert "numpy" not in runtime and "jax" in runtime and "torch" in extras["test"]
    problems = undeclared(_python_files(*RUNTIME_DIRS), runtime, runtime, FIRST_PARTY)
    assert any("`import numpy`" in p for p in problems)
    assert any("`import torch`" in p for p in problems)  # bench_generate's optional torch is in no runtime list


def test_jinja2_is_declared():
    """transformers imports jinja2 only when a chat template is rendered, so no import in this code shows it."""
    assert "jinja2" in declared()[0]

"""The package's shape: imports go one way (no cycle, layers never import upwards), the data layer loads without
the model code, and BUILD_NOTES.md's layout map names every module."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rosa2_jax"
# Each layer may import only the layers listed after it (and itself).
LAYERS = ["study", "engine", "adapt", "checkpoint", "model", "tasks"]
BELOW = {layer: set(LAYERS[i:]) | {"errors", "fetch", "distributed", "kernels"} for i, layer in enumerate(LAYERS)}


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports at run time, wherever in the file (a function's import counts)."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {m: imports_of(p, set(files)) - {m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n] if n in path else [m, n]
            if n not in state and (cycle := visit(n, path + [n])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_import_only_downwards():
    wrong = []
    for m, deps in import_graph().items():
        layer = m.split(".")[1] if m.count(".") else None
        if layer not in BELOW:
            continue
        wrong += [f"{m} imports {d}" for d in deps if d.count(".") and d.split(".")[1] not in BELOW[layer]]
    assert wrong == []


def test_the_data_layer_loads_without_jax_or_the_model():
    out = subprocess.run([sys.executable, "-c", "import sys, rosa2_jax.tasks.data, rosa2_jax.tasks.rewards; "
                          "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith(('rosa2_jax.model', "
                          "'transformers'))))"], capture_output=True, text=True, check=True, cwd=ROOT / "tests")
    assert out.stdout.strip() == "[]"


def test_the_build_notes_layout_map_names_every_module():
    notes = (ROOT / "BUILD_NOTES.md").read_text()
    block = re.search(r"## Layout\n.*?```\n(.*?)```", notes, re.S)
    assert block, "BUILD_NOTES.md has no ## Layout section with a map"
    listed, inside, folder = set(), False, None
    for line in block.group(1).splitlines():
        m = re.match(r"( *)([\w.]+/?)(\s|$)", line)
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(2)
        if indent == 0:  # rosa2_jax/ opens the package's part of the map; kernels/, experiments/ close it
            inside, folder = name == "rosa2_jax/", None
        elif inside and name.endswith("/") and indent == 2:
            folder = name[:-1]
        elif inside and name.endswith(".py"):
            listed.add(f"{folder}/{name}" if indent > 2 else name)
            folder = folder if indent > 2 else None
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert modules - listed == set(), "modules missing from BUILD_NOTES.md's layout map"
    assert listed - modules == set(), "the layout map names modules that do not exist"



def test_every_reference_to_a_build_notes_section_names_one():
    headings = {re.sub(r"^#+ ", "", line) for line in (ROOT / "BUILD_NOTES.md").read_text().splitlines()
                if line.startswith("#")}
    wrong = []
    for path in [ROOT / "README.md", *PACKAGE.rglob("*.py"), *(ROOT / "experiments").rglob("*.py")]:
        for name in re.findall(r'BUILD_NOTES\.md, \\?"([^"\\]+)\\?"', path.read_text()):
            if not any(h.startswith(name) for h in headings):
                wrong.append(f"{path.relative_to(ROOT)}: {name!r}")
    assert wrong == []

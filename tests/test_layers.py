"""The layer map of README.md's "Layout" section is the import rule of gpuprune/, checked here.

Every import of every module counts: module level, inside functions, under ``TYPE_CHECKING``. An
import may reach a module of its own layer or a lower one, never a higher one, and no chain of
imports may lead back to where it started (a cycle, function-level imports included). Every module
must be in the map. The map is read from the README itself, so the documented rule and the checked
rule cannot drift apart; the checker is tested on a planted package first.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: cycles known and owned elsewhere, each with the reason; every entry must still exist (so it is
#: deleted from here when it is fixed), and no other cycle may appear
KNOWN_CYCLES = {
    # kernels/_loader.py imports KernelOps from ops.py, ops.py imports get_ops from _loader.py
    # inside a function: issue 21, the GPU engineer's part (branch gpu)
    frozenset({"gpuprune.kernels._loader", "gpuprune.kernels.ops"}),
}


# ---------------------------------------------------------------- the checker
def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package at ``package_dir`` (a package's
    ``__init__.py`` is the package's own name)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, from every import statement in its source."""
    modules = module_names(package_dir)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from x import y` imports module x.y when there is one, else names of x
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:      # `import a.b.c`: the deepest module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def parse_layers(text: str, package: str) -> dict[str, int]:
    """Module pattern -> layer, from the table rows ``| <layer> | `a`, `b/` | ... |`` of the
    "## Layout" section: ``name`` is one module, ``name/`` a package and everything in it, the
    package's own name its ``__init__``."""
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for entry in re.findall(r"`([^`]+)`", cells[1]):
                key = package if entry == package else f"{package}.{entry.rstrip('/')}"
                layers[key + (".*" if entry.endswith("/") else "")] = int(cells[0])
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    if module in layers:
        return layers[module]
    for pattern, layer in layers.items():
        if pattern.endswith(".*") and (module == pattern[:-2]
                                       or module.startswith(pattern[:-1])):
            return layer
    return None


def violations(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Every import of a higher layer, and every module the map leaves out."""
    out = [f"{m} is not in the layer map" for m in sorted(graph) if layer_of(m, layers) is None]
    for m in sorted(graph):
        for t in sorted(graph[m]):
            lm, lt = layer_of(m, layers), layer_of(t, layers)
            if lm is not None and lt is not None and lt > lm:
                out.append(f"{m} (layer {lm}) imports {t} (layer {lt})")
    return out


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ---------------------------------------------------------------- the test of the test
def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "planted"
    for name, source in files.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return pkg


PLANTED_MAP = """
## Layout
| layer | modules | role |
|---|---|---|
| 0 | `low`, `leaf` | leaves |
| 1 | `high`, `sub/` | the rest |
| 2 | `planted` | the package |

## Next section
| 0 | `high` | (outside the Layout section: ignored) |
"""


def test_the_checker_finds_a_planted_upward_import_cycle_and_unmapped_module(tmp_path):
    pkg = plant(tmp_path, {
        "__init__.py": "from . import high\n",
        "leaf.py": "import os\n",
        "low.py": """
            from . import leaf
            def late():
                from .sub import deep        # planted: layer 0 imports layer 1, in a function
                return deep
            """,
        "high.py": "from .low import late\nfrom .sub.deep import X\n",
        "sub/__init__.py": "",
        "sub/deep.py": """
            from typing import TYPE_CHECKING
            X = 1
            if TYPE_CHECKING:
                from ..high import late      # planted: a cycle high -> low -> sub.deep -> high
            """,
        "stray.py": "",
    })
    graph = import_graph(pkg)
    assert graph["planted.low"] == {"planted.leaf", "planted.sub.deep"}
    assert graph["planted.high"] == {"planted.low", "planted.sub.deep"}
    layers = parse_layers(PLANTED_MAP, "planted")
    assert layers == {"planted.low": 0, "planted.leaf": 0, "planted.high": 1, "planted.sub.*": 1,
                      "planted": 2}
    assert violations(graph, layers) == [
        "planted.stray is not in the layer map",
        "planted.low (layer 0) imports planted.sub.deep (layer 1)"]
    assert cycles(graph) == [frozenset({"planted.high", "planted.low", "planted.sub.deep"})]
    # and once the planted imports are gone, it is clean
    (pkg / "low.py").write_text("from . import leaf\n")
    (pkg / "sub" / "deep.py").write_text("X = 1\n")
    (pkg / "stray.py").unlink()
    graph = import_graph(pkg)
    assert violations(graph, layers) == [] and cycles(graph) == []


# ---------------------------------------------------------------- gpuprune
@pytest.fixture(scope="module")
def gpuprune_graph() -> dict[str, set[str]]:
    return import_graph(ROOT / "gpuprune")


@pytest.fixture(scope="module")
def readme_layers() -> dict[str, int]:
    return parse_layers(README.read_text(), "gpuprune")


def test_every_import_follows_the_readme_layer_map(gpuprune_graph, readme_layers):
    assert violations(gpuprune_graph, readme_layers) == []


def test_no_import_cycle_function_level_imports_included(gpuprune_graph):
    found = set(cycles(gpuprune_graph))
    assert found - KNOWN_CYCLES == set(), "new import cycles"
    assert KNOWN_CYCLES - found == set(), "a known cycle is fixed: delete it from KNOWN_CYCLES"


def test_the_map_places_the_packages_to_come(readme_layers):
    """The packages other work adds must have their place before they land."""
    for package in ("dali", "integrations", "kernels", "doctor", "bench"):
        assert f"gpuprune.{package}.*" in readme_layers, package

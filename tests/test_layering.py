"""The package's layering, read from the source with `ast`: no import cycle, no upward import.

Every import statement counts, including the ones inside functions (a function-local import hides a cycle from
Python's loader, not from a reader). The layers, top to bottom: commands → sampling / training → modeling →
kernels; `convert` reads checkpoints for everyone and so sits below `sampling`; `pallas_kernels` is a
standalone package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cosmos_jax", "pallas_kernels")

# (importer prefix, imported prefix) pairs that point upward.
FORBIDDEN = (
    ("cosmos_jax.modeling", "cosmos_jax.sampling"),
    ("cosmos_jax.modeling", "cosmos_jax.convert"),
    ("cosmos_jax.modeling", "cosmos_jax.training"),
    ("cosmos_jax.modeling", "cosmos_jax.commands"),
    ("cosmos_jax.convert", "cosmos_jax.sampling"),
    ("cosmos_jax.sampling", "cosmos_jax.serve"),
    ("cosmos_jax.serve", "cosmos_jax.commands"),
    ("pallas_kernels", "cosmos_jax"),
)


def module_names(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py under the packages (a package is its __init__)."""
    names = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join(parts)] = path
    return names


def _resolve(name: str, names: dict[str, Path]) -> str | None:
    """The project module that importing `name` runs last (its longest existing prefix), or None."""
    while name and name not in names:
        name = name.rpartition(".")[0]
    return name or None


def _imported(node: ast.AST, module: str, is_package: bool, names: dict[str, Path]) -> list[str | None]:
    """The project modules one import statement names: `from a import b` is the module a.b when that exists,
    else a (b is then a name defined in a)."""
    if isinstance(node, ast.Import):
        return [_resolve(alias.name, names) for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [_resolve(f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base, names)
            for alias in node.names]


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in the file, function bodies included)."""
    names = module_names(root, packages)
    graph: dict[str, set[str]] = {}
    for module, path in names.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = {
            target for node in ast.walk(tree)
            for target in _imported(node, module, path.name == "__init__.py", names)
            if target is not None and target != module
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """"importer -> imported" for every forbidden pair."""

    def under(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    return sorted(
        f"{a} -> {b}" for a, targets in graph.items() for b in targets
        for low, high in FORBIDDEN if under(a, low) and under(b, high)
    )


def test_the_graph_sees_the_packages():
    graph = import_graph(ROOT)
    assert "cosmos_jax.modeling.transformer" in graph and "pallas_kernels.forward" in graph
    assert "cosmos_jax.modeling.attention" in graph["cosmos_jax.modeling.transformer"] | {
        t for m in graph["cosmos_jax.modeling.transformer"] for t in graph.get(m, ())
    }


def test_no_import_cycle():
    assert find_cycle(import_graph(ROOT)) is None


def test_no_upward_import():
    assert upward_imports(import_graph(ROOT)) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("files, cycle", [
    ({"cosmos_jax/__init__.py": "", "cosmos_jax/a.py": "from cosmos_jax import b\n",
      "cosmos_jax/b.py": "def f():\n    from cosmos_jax.a import g\n"},
     ["cosmos_jax.a", "cosmos_jax.b", "cosmos_jax.a"]),
    ({"cosmos_jax/__init__.py": "", "cosmos_jax/p/__init__.py": "", "cosmos_jax/p/a.py": "from . import b\n",
      "cosmos_jax/p/b.py": "from .a import x\n"},
     ["cosmos_jax.p.a", "cosmos_jax.p.b", "cosmos_jax.p.a"]),
])
def test_a_planted_cycle_is_found(tmp_path, files, cycle):
    _write(tmp_path, files)
    assert find_cycle(import_graph(tmp_path, ("cosmos_jax",))) == cycle


def test_planted_upward_imports_are_found(tmp_path):
    _write(tmp_path, {
        "cosmos_jax/__init__.py": "",
        "cosmos_jax/modeling/__init__.py": "",
        "cosmos_jax/modeling/m.py": "def f():\n    import cosmos_jax.sampling.s\n",
        "cosmos_jax/sampling/__init__.py": "",
        "cosmos_jax/sampling/s.py": "import numpy\n",
        "cosmos_jax/convert/__init__.py": "",
        "cosmos_jax/convert/c.py": "from cosmos_jax.sampling import s\n",
        "pallas_kernels/__init__.py": "",
        "pallas_kernels/k.py": "from cosmos_jax.modeling.m import f\n",
    })
    assert upward_imports(import_graph(tmp_path)) == [
        "cosmos_jax.convert.c -> cosmos_jax.sampling.s",
        "cosmos_jax.modeling.m -> cosmos_jax.sampling.s",
        "pallas_kernels.k -> cosmos_jax.modeling.m",
    ]
    assert find_cycle(import_graph(tmp_path)) is None

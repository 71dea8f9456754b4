"""The package's modules import one way: no cycle, and the low layers stay low.

The graph is read from the source (ast), every `import` and `from ... import`
of an `opa_jax` module counted wherever it stands (a function-level import
still ties its module to the other). The rule for an edge:

- `import opa_jax.a.b` and `from opa_jax.a import b` (b a module) are edges to
  `opa_jax.a.b`; `from opa_jax.a import name` (a name that `opa_jax/a/__init__.py`
  defines) is an edge to the package `opa_jax.a`.
- An import of `opa_jax.a.b` from outside the package `opa_jax.a` is an edge to
  `opa_jax.a` as well: Python runs the package's `__init__` first. From inside
  the package it is not, since a package's `__init__` that imports its own
  modules would otherwise close a loop with each of them. So the root `opa_jax`
  is reached only by importing it, e.g. `import opa_jax` for a name it defines.
- The package root's own imports are edges like any other: `opa_jax/__init__.py`
  importing `opa_jax.api` is the edge `opa_jax -> opa_jax.api`.
"""

import ast
import graphlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "opa_jax"


def module_files() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name (a package by its `__init__.py`)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, source: str, modules, is_package: bool = False) -> set[str]:
    """The package's modules that module `name` (whose text is `source`) imports, by the
    rule in the module docstring."""
    targets = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            origin = node.module or ""
            if node.level:  # relative: from the module's package, `level - 1` levels up
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([origin] if origin else []))
            for alias in node.names:
                child = f"{origin}.{alias.name}"
                targets.add(child if child in modules else origin)
    targets = {t for t in targets if t == "opa_jax" or t.startswith("opa_jax.")}
    for target in list(targets):  # the package inits Python runs on the way in
        parts = target.split(".")
        for depth in range(2, len(parts)):
            package = ".".join(parts[:depth])
            if not (name == package or name.startswith(package + ".")):
                targets.add(package)
    unknown = targets - set(modules)
    assert not unknown, f"{name} imports {sorted(unknown)}, which are not modules of opa_jax"
    return targets - {name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {
        name: imported_modules(name, path.read_text(), modules, path.name == "__init__.py")
        for name, path in modules.items()
    }


def reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_rule_reads_imports_as_python_loads_them(graph):
    modules = {"opa_jax", "opa_jax.a", "opa_jax.a.b", "opa_jax.a.c", "opa_jax.d"}
    source = """
from opa_jax.a import b


def late():
    import opa_jax.d  # a function-level import counts
"""
    expected = {"opa_jax.a.b", "opa_jax.a", "opa_jax.d"}
    assert imported_modules("opa_jax.x", source, modules) == expected
    # Inside its package, a module does not depend on the package's own init.
    assert imported_modules("opa_jax.a.c", source, modules) == {"opa_jax.a.b", "opa_jax.d"}
    relative = "from . import b\nfrom ..d import name\n"
    assert imported_modules("opa_jax.a.c", relative, modules) == {"opa_jax.a.b", "opa_jax.d"}
    assert imported_modules("opa_jax.a", relative, modules, True) == {"opa_jax.a.b", "opa_jax.d"}
    # On the package itself: the root's import of the API is an edge like any other.
    assert "opa_jax.api" in graph["opa_jax"]
    assert {"opa_jax.models", "opa_jax.models.checkpoint"} <= graph["opa_jax.train"]
    assert "opa_jax.models" not in graph["opa_jax.models.checkpoint"]


def test_the_package_has_no_import_cycle(graph):
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(reversed(e.args[1]))}")
    assert len(order) == len(graph)


def test_the_version_is_a_leaf_that_provenance_reads(graph):
    assert graph["opa_jax._version"] == set()
    assert "opa_jax" not in reachable(graph, "opa_jax.provenance")
    import opa_jax
    from opa_jax import _version

    assert opa_jax.__version__ == _version.__version__


def test_training_does_not_import_the_attack_stack(graph):
    below = reachable(graph, "opa_jax.train")
    assert "opa_jax.config_identity" in below
    assert not below & {"opa_jax.workdir", "opa_jax.attack", "opa_jax.run", "opa_jax.api"}


def test_runs_and_exports_load_onnx_models_through_load_model(graph):
    for name in ("opa_jax.plan", "opa_jax.export"):
        assert "opa_jax.models.onnx_import" not in graph[name], name

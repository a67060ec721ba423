"""Layers point one way: no import cycles inside `ich`, not even through imports inside functions, and no module
of the package reads a helper from an entry module. Read from the source with `ast`: nothing is imported."""

import ast
from collections.abc import Mapping
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "ich"
# What the root scripts and the `python -m ich.<command>` commands run; code below them never imports them.
ENTRY_MODULES = ("ich.train", "ich.evaluate", "ich.predict", "ich.export", "ich.report", "ich.prepare", "ich.bench",
                 "ich.gpu_check", "ich.phantom", "ich.serve", "ich.site_shift")
# Commands made of other commands: each may call the `run` of the entry modules listed, and nothing else may.
COMPOSED_COMMANDS = {"ich.site_shift": {"ich.train", "ich.evaluate"}}
# The job folders from the bottom up. A module imports from its own folder and from folders of a lower rank only;
# folders of one rank (inference and classical) do not import each other; the DICOM node (node/) serves what
# inference answers. The modules at the top of `ich/` (the entry modules and cli, what they share) may import
# anything below them; the package root (CONFIG_DIR, __version__) sits under everything.
RANKS = {"ich": -1, "ich.core": 0, "ich.data": 1, "ich.models": 2, "ich.evaluation": 3, "ich.training": 4,
         "ich.inference": 5, "ich.classical": 5, "ich.node": 6, "top": 7}


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """ich/classical/fit.py -> ich.classical.fit; a package's __init__.py is the package itself."""
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_sources(package_dir: Path = PACKAGE_DIR) -> dict[str, tuple[str, bool]]:
    """Module name -> (source, whether it is a package's __init__) for every .py file of the package."""
    return {
        module_name(path, package_dir): (path.read_text(), path.name == "__init__.py")
        for path in sorted(package_dir.rglob("*.py"))
    }


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every dotted name the module imports, at module level or inside functions; relative imports resolved,
    and `from x import y` read as both `x.y` (a submodule) and `x` (a name defined in x)."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            origin = ".".join(part for part in (base, node.module) if part)
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names)
    return names


def import_graph(sources: Mapping[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (names that are not modules of the package are dropped:
    a `from ich.core.tasks import LABELS` is an edge to ich.core.tasks, `import torch` no edge at all)."""
    return {
        module: {name for name in imported_names(source, module, is_package) if name in sources and name != module}
        for module, (source, is_package) in sources.items()
    }


def find_cycle(graph: Mapping[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (depth-first search, three colours)."""
    done, path, on_path = set(), [], set()

    def visit(module: str) -> list[str]:
        path.append(module)
        on_path.add(module)
        for target in sorted(graph[module]):
            if target in on_path:
                return path[path.index(target):] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(module)
        done.add(module)
        return []

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle:
                return cycle
    return []


def entry_imports(graph: Mapping[str, set[str]]) -> list[str]:
    """`importer -> entry module` for every module of the package that imports an entry module (but the ones a
    composed command runs)."""
    entries = set(ENTRY_MODULES)
    return sorted(f"{module} -> {target}" for module, targets in graph.items()
                  for target in targets & entries - COMPOSED_COMMANDS.get(module, set()))


def folder(module: str) -> str:
    """ich.data.dicom -> ich.data; ich.train (a module at the top) -> top; the package itself -> ich."""
    parts = module.split(".")
    return "ich" if len(parts) == 1 else "top" if len(parts) == 2 and f"ich.{parts[1]}" not in RANKS else ".".join(parts[:2])


def upward_imports(graph: Mapping[str, set[str]]) -> list[str]:
    """`importer -> target` for every import that reaches a folder of the same or a higher rank (not its own)."""
    return sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                  if folder(target) != folder(module) and RANKS[folder(target)] >= RANKS[folder(module)])


def test_the_graph_sees_imports_inside_functions_and_relative_imports():
    sources = {
        "ich": ("", True),
        "ich.a": ("def f():\n    from ich.b import g\n", False),
        "ich.b": ("from . import c\nfrom .c import h\nimport ich.core.tasks as t\n", False),
        "ich.c": ("def h():\n    import ich.a\n", False),
        "ich.sub": ("from .. import b\n", True),
        "ich.sub.d": ("from ..c import h\nfrom .e import x\n", False),
        "ich.sub.e": ("import numpy\n", False),
    }
    graph = import_graph(sources)
    assert graph["ich.a"] == {"ich.b"} and graph["ich.b"] == {"ich", "ich.c"} and graph["ich.c"] == {"ich.a"}
    assert graph["ich.sub"] == {"ich", "ich.b"} and graph["ich.sub.d"] == {"ich.c", "ich.sub.e"}
    assert find_cycle(graph) == ["ich.a", "ich.b", "ich.c", "ich.a"]
    del sources["ich.c"]
    assert find_cycle(import_graph(sources)) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph(package_sources())
    assert "ich.train" in graph and graph["ich.train"], "the package was not read: no imports found in ich/train.py"
    cycle = find_cycle(graph)
    assert not cycle, f"Import cycle: {' -> '.join(cycle)}; move the shared code into a lower module both can import."


def test_no_module_of_the_package_imports_an_entry_module():
    offenders = entry_imports(import_graph(package_sources()))
    assert not offenders, (
        f"{', '.join(offenders)}: entry modules are for the root scripts; move the helper into a lower module."
    )


def test_every_module_sits_in_a_job_folder_of_known_rank():
    unknown = sorted(module for module in package_sources() if folder(module) not in RANKS)
    assert not unknown, f"{', '.join(unknown)}: put the module in a folder of RANKS (tests/test_layers.py)."


def test_imports_point_down_the_job_folders():
    graph = import_graph(package_sources())
    assert "ich.inference.answer" in graph, "the package was not read: ich/inference/answer.py is missing"
    offenders = upward_imports(graph)
    assert not offenders, (
        f"{', '.join(offenders)}: a folder imports only from folders below it (RANKS in tests/test_layers.py); move the "
        "shared piece down."
    )


def test_an_import_up_the_folders_is_named():
    graph = {"ich.data.index": {"ich.core.tasks", "ich.training.module"}, "ich.training.module": {"ich.data.index"},
             "ich.inference.deploy": {"ich.classical.fit"}, "ich.train": {"ich.cli", "ich"}, "ich.cli": {"ich.data.dicom"},
             "ich.classical.fit": set(), "ich.core.tasks": set(), "ich": set(), "ich.data.dicom": set()}
    assert upward_imports(graph) == ["ich.data.index -> ich.training.module", "ich.inference.deploy -> ich.classical.fit"]

"""The rules of docs/architecture.md, checked on the source: what may import what.

Imports are read from the syntax tree (module level and inside functions alike), so a rule is
broken the moment someone writes the import, not only when it runs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "colbertkit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> list[tuple[str, list[str], bool]]:
    """(imported module, names, at module level) for every colbertkit import in ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "colbertkit":
                names = [alias.name for alias in node.names]
                found.append((node.module, names, id(node) in top_level))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "colbertkit":
                    found.append((alias.name, [], id(node) in top_level))
    return found


def resolve(imported: str, names: list[str]) -> list[str]:
    """The modules an import touches (``from colbertkit.checkpoint import files`` is one)."""
    targets = [imported] if imported in MODULES else []
    targets += [f"{imported}.{n}" for n in names if f"{imported}.{n}" in MODULES]
    return targets or [imported]


def test_no_module_imports_another_modules_private_names():
    offenders = [
        f"{name} imports {imported}.{private}"
        for name in MODULES
        for imported, names, _ in imports_of(name)
        for private in names
        if private.startswith("_") and not private.startswith("__") and imported != name
    ]
    assert offenders == []


def test_there_is_no_import_circle_at_module_level():
    graph = {
        name: {
            target
            for imported, names, top in imports_of(name)
            if top
            for target in resolve(imported, names)
            if target in MODULES and target != name
        }
        for name in MODULES
    }
    # Packages import their submodules lazily; an edge into a package's own child is fine.
    visiting, done, circles = set(), set(), []

    def visit(node: str, path: list[str]) -> None:
        if node in done:
            return
        if node in visiting:
            circles.append(" -> ".join([*path[path.index(node) :], node]))
            return
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        visiting.discard(node)
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert circles == []


LAYER_RULES = [
    # (modules, what they must not import): the arrows of docs/architecture.md
    ("colbertkit.checkpoint", ("colbertkit.training", "colbertkit.scorer", "colbertkit.export",
                               "colbertkit.launcher", "colbertkit.cli", "colbertkit.validation")),
    ("colbertkit.worker", ("colbertkit.cli",)),
    ("colbertkit.score_worker", ("colbertkit.cli", "colbertkit.training")),
    ("colbertkit.distributed_scoring", ("colbertkit.cli", "colbertkit.training",
                                        "colbertkit.export")),
    ("colbertkit.processes", ("colbertkit.cli", "colbertkit.training", "colbertkit.scorer",
                              "colbertkit.checkpoint")),
    ("colbertkit.training", ("colbertkit.cli", "colbertkit.launcher", "colbertkit.export")),
    ("colbertkit.scoring", ("colbertkit.model", "colbertkit.checkpoint", "colbertkit.training")),
    ("colbertkit.losses", ("colbertkit.model", "colbertkit.checkpoint", "colbertkit.training")),
    ("colbertkit.metrics", ("colbertkit.model", "colbertkit.checkpoint", "colbertkit.training")),
    ("colbertkit.runs", ("colbertkit.model", "colbertkit.checkpoint", "colbertkit.training",
                         "colbertkit.scorer")),
    ("colbertkit.evaluation", ("colbertkit.cli", "colbertkit.training", "colbertkit.launcher",
                               "colbertkit.export")),
]  # fmt: skip


@pytest.mark.parametrize(("owner", "forbidden"), LAYER_RULES)
def test_layers_import_only_downwards(owner, forbidden):
    offenders = [
        f"{name} imports {imported}"
        for name in MODULES
        if name == owner or name.startswith(owner + ".")
        for imported, _, _ in imports_of(name)
        if any(imported == f or imported.startswith(f + ".") for f in forbidden)
    ]
    assert offenders == []


def test_only_the_cli_imports_the_cli():
    offenders = [
        f"{name} imports {imported}"
        for name in MODULES
        if not name.startswith("colbertkit.cli") and name != "colbertkit.__main__"
        for imported, _, _ in imports_of(name)
        if imported.startswith("colbertkit.cli")
    ]
    assert offenders == []


def test_help_imports_no_torch():
    # What keeps `colbertkit --help` instant: nothing heavy is imported to print it.
    code = (
        "import sys\n"
        "from colbertkit.cli.app import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout

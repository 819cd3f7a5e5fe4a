"""The house's shape, kept true by a test: arrows between packages point down only (so there is no
cycle between them), and the run's driver in training/ stays made of short functions.

An import from package A to package B, at module level or inside a function, is allowed only when B
stands on a lower layer than A. Siblings on one layer (losses, solvers, dataloaders) import neither
each other nor anything above them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS: tuple[tuple[str, ...], ...] = (
    ("paths",),  # forward processes: probability paths, time samplers, the diffusion schedule
    ("models",),  # our networks
    ("adapters",),  # foreign models (open_clip, diffusers, peft) meeting our contract
    ("losses", "solvers", "dataloaders"),
    ("evaluation",),
    ("training",),  # the run: trainer, callbacks, checkpoints, backends
    ("launcher", "scripts", "hydra_plugins"),  # entry points
)
RANK = {package: rank for rank, names in enumerate(LAYERS) for package in names}
MAX_FUNCTION_LINES = 80


def modules() -> list[Path]:
    files = [ROOT / "launcher.py"]
    for package in RANK:
        if (ROOT / package).is_dir():
            files += sorted((ROOT / package).rglob("*.py"))
    return files


def package_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level project package) for every absolute import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in RANK]
    return found


def arrows() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the places, for every arrow between two packages."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in modules():
        source = package_of(path)
        for line, target in imported_packages(path):
            if target != source:
                edges.setdefault((source, target), []).append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def test_every_project_package_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} - {"tests"}
    assert packages <= set(RANK), f"give {sorted(packages - set(RANK))} a layer in LAYERS"


def test_arrows_between_packages_point_down_only():
    upward = [f"{a} -> {b} at {', '.join(places)}" for (a, b), places in sorted(arrows().items()) if RANK[b] >= RANK[a]]
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_there_is_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for a, b in arrows():
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    assert [p for p in graph if reaches(p, p, set())] == []


@pytest.mark.parametrize("path", sorted((ROOT / "training").rglob("*.py")), ids=lambda p: p.name)
def test_the_run_is_made_of_short_functions(path: Path):
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"split {', '.join(long)} (at most {MAX_FUNCTION_LINES} lines)"


def test_an_import_inside_a_function_counts_too(tmp_path: Path):
    module = tmp_path / "late.py"
    module.write_text("import torch\n\n\ndef f():\n    from training.errors import UserError\n    import models.mlp\n")
    assert imported_packages(module) == [(5, "training"), (6, "models")]

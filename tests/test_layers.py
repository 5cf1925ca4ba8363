"""The layers of docs/design.md hold: a module imports only from its own layer or lower ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loraplace"

# Lowest first. The edge is every module directly in loraplace/ except config. The run spec is
# the contract between a study and its runs: the study writes it, the run reads it, so it sits
# above the config and below training.
RANKS = {
    "core": 0,
    "plan": 1,
    "data": 1,
    "fast": 2,
    "config": 3,
    "spec": 3.5,
    "train": 4,
    "analysis": 4,
    "advise": 5,
    "study": 5,
    "edge": 5,
}


def layer(module: str) -> str:
    """'loraplace.plan.roles' -> 'plan'; 'loraplace.study.spec' -> 'spec'; 'loraplace.cli' ->
    'edge'."""
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # the package itself holds only __version__
    if module == "loraplace.study.spec":
        return "spec"
    if parts[1] == "__main__":
        return "edge"
    return parts[1] if parts[1] in RANKS else "edge"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        found[name] = path
    return found


def imports(path: Path) -> set[str]:
    """Every loraplace module `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("loraplace")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loraplace"):
            known = modules()
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                names.add(sub if sub in known else node.module)
    return names


def test_the_rule_is_checked_on_every_module():
    found = modules()
    assert {layer(m) for m in found} == set(RANKS), "a layer without modules, or a new one"
    assert layer("loraplace.fast.kernels") == "fast" and layer("loraplace.cli") == "edge"
    assert layer("loraplace.study.local") == "study" and layer("loraplace.study.spec") == "spec"


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_imports_from_a_higher_layer(name):
    here = layer(name)
    higher = sorted(m for m in imports(modules()[name]) if RANKS[layer(m)] > RANKS[here])
    assert not higher, f"{name} ({here}) imports {higher} from a higher layer"


def test_the_fast_paths_never_import_the_config_or_training():
    for name, path in modules().items():
        if layer(name) == "fast":
            assert not {layer(m) for m in imports(path)} & {"config", "train"}, name


def test_no_import_cycle():
    """Following every import (at the top or inside a function) never leads back."""
    found = modules()
    graph = {name: imports(path) & set(found) for name, path in found.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph[name] - {name}):
            if state.get(other) == "open":
                cycle = trail[trail.index(other) :] + [other] if other in trail else [other]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if other not in state:
                visit(other, trail + [other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_module_imports_anothers_private_names():
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loraplace"):
                private = [
                    a.name
                    for a in node.names
                    if a.name.startswith("_") and not a.name.endswith("__")
                ]  # dunders (__version__) are public
                assert not private, f"{name} imports {private} from {node.module}"

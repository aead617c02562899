"""The package's shape: layers, no import cycles, no private names across modules, each sub-package alone."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PKG = REPO / "pipeline"
#: Lower layers never import higher ones (a module may import its own layer).
LAYERS = ["contract", "registry", "ops", "models", "stages", "review", "learning", "runners", "cli"]
#: Within ``stages``, the order of the night: a stage imports only stages before it.
STAGE_ORDER = ["ingest", "decode", "dedupe", "nearpairs", "junk", "scan", "classify", "copies", "output"]


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    """module -> {(imported pipeline module, names)} for every import, lazy ones inside functions too."""
    graph = {}
    modules = {_module(p) for p in PKG.rglob("*.py")}
    for path in PKG.rglob("*.py"):
        mod = _module(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                assert node.level == 0
                names = tuple(a.name for a in node.names)
                for n in names:  # `from pipeline.stages import decode` imports a module
                    if f"{node.module}.{n}" in modules:
                        found.add((f"{node.module}.{n}", ()))
                found.add((node.module, names))
            elif isinstance(node, ast.Import):
                found |= {(a.name, ()) for a in node.names if a.name.startswith("pipeline")}
        graph[mod] = {(m, n) for m, n in found if m != mod and m in modules}
    return graph


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycles():
    graph = {m: {t for t, _ in deps} for m, deps in _imports().items()}
    graph = {m: {t for t in deps if t != "pipeline"} for m, deps in graph.items()}  # the package's __version__
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_layers_only_import_downwards():
    bad = []
    for mod, deps in _imports().items():
        if mod == "pipeline" or _layer(mod) == "__main__":
            continue
        for target, _ in deps:
            if target == "pipeline":
                continue
            lm, lt = LAYERS.index(_layer(mod)), LAYERS.index(_layer(target))
            if lt > lm:
                bad.append(f"{mod} imports {target}")
            if _layer(mod) == _layer(target) == "stages" and mod != "pipeline.stages" and target != "pipeline.stages":
                if STAGE_ORDER.index(target.split(".")[2]) >= STAGE_ORDER.index(mod.split(".")[2]):
                    bad.append(f"stage {mod} imports a later stage {target}")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = [f"{mod}: {target}.{n}" for mod, deps in _imports().items() for target, names in deps
           for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, bad


@pytest.mark.parametrize("sub", ["contract", "registry", "ops", "models", "stages", "review", "learning", "runners", "cli"])
def test_each_sub_package_imports_on_its_own(sub):
    """Every module of the sub-package, in a fresh interpreter that has imported nothing else first."""
    folder = PKG / sub
    mods = sorted(_module(p) for p in folder.rglob("*.py")) if folder.is_dir() else [f"pipeline.{sub}"]
    done = subprocess.run([sys.executable, "-c", "import " + ", ".join(mods)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_only_runners_know_the_stage_order():
    """A stage never calls another stage's entry point to move the night along: no stage imports the runners."""
    for mod, deps in _imports().items():
        if _layer(mod) == "stages":
            assert not any(_layer(t) in ("runners", "cli") for t, _ in deps), mod


def test_no_test_imports_another_test_module():
    tests = REPO / "tests"
    bad = []
    for path in tests.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            bad += [f"{path.name} imports {n}" for n in names if n.split(".")[-1].startswith("test_")]
    assert not bad, bad

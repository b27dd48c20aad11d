"""The project's import graph: no cycle among its modules, and dependencies that point one way.

Every import counts, also one inside a function (a lazy import may keep start-up fast; it may not hide a cycle).
The layers are the developers' guide's data flow (conf/ → sweep/ → data/, model/ → MLflow → analysis/) and
sweep/'s packages by concern (the order of SWEEP_LAYERS: a package may import only the ones before it).
"""

from __future__ import annotations

import ast
import pathlib
import typing as tp

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("sweep", "model", "data", "analysis", "hydra_plugins")
# sweep/'s packages, lowest first; the command-line modules (sweep/*.py) may import any of them.
SWEEP_LAYERS = ("sweep.core", "sweep.tracking", "sweep.slurm", "sweep.resources", "sweep.jobs", "sweep.orchestration")
# The generic launchers import nothing of the project (any Hydra app can use them).
GENERIC = ("hydra_plugins.scaling_unet.hints", "hydra_plugins.scaling_unet.pool", "hydra_plugins.scaling_unet.slurm_array")


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            parts = f.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """{module: project modules it imports anywhere in its body}; ``from a import b`` counts a.b when that is a
    module, else a."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = m.split(".") if is_pkg else m.split(".")[:-1]
                    up = up[:len(up) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # import a.b.c of a package: its closest module
                    t = t.rpartition(".")[0]
                if t and t != m:
                    graph[m].add(t)
    return graph


def cycles(graph: tp.Mapping[str, tp.Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_projects_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (every import counts, also inside functions):\n" + "\n".join(
        " ↔ ".join(c) for c in found)


def _layer(m: str) -> tp.Optional[int]:
    for i, pkg in enumerate(SWEEP_LAYERS):
        if m == pkg or m.startswith(pkg + "."):
            return i
    return None


def _wrong_way(graph: tp.Mapping[str, tp.Iterable[str]]) -> list[str]:
    bad = []
    for m, deps in sorted(graph.items()):
        top = m.split(".")[0]
        for d in sorted(deps):
            dtop = d.split(".")[0]
            if top in ("model", "data") and dtop in ("sweep", "analysis", "hydra_plugins"):
                bad.append(f"{m} → {d}: model/ and data/ never import sweep/, analysis/ or the plugins")
            elif top == "data" and dtop == "model":
                bad.append(f"{m} → {d}: data/ never imports model/")
            elif top == "analysis" and dtop in ("sweep", "hydra_plugins"):
                bad.append(f"{m} → {d}: analysis/ reads MLflow, never sweep/")
            elif m in GENERIC and dtop in ("sweep", "model", "data", "analysis"):
                bad.append(f"{m} → {d}: a generic launcher imports nothing of the project")
            elif _layer(m) is not None and _layer(d) is not None and _layer(d) > tp.cast(int, _layer(m)):
                bad.append(f"{m} → {d}: {SWEEP_LAYERS[_layer(m)]} may import only {SWEEP_LAYERS[:_layer(m)]}")
            elif _layer(m) is not None and d.startswith("sweep.") and _layer(d) is None \
                    and d not in ("sweep",) and not d.startswith("sweep.core"):
                bad.append(f"{m} → {d}: a library package never imports a command-line module")
    return bad


def test_layer_rule_catches_a_wrong_way_arrow():
    graph = {"sweep.core.errors": {"sweep.jobs.train"}, "model.unet": {"sweep.core.errors"},
             "sweep.jobs.train": {"sweep.plan"}, "sweep.tracking.client": {"sweep.core.params"}}
    assert len(_wrong_way(graph)) == 3


def test_dependencies_point_one_way():
    bad = _wrong_way(import_graph())
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pkg", SWEEP_LAYERS)
def test_every_sweep_package_says_what_it_holds(pkg):
    init = REPO / pkg.replace(".", "/") / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{init}: no docstring"

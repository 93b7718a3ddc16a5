"""The layering of oracles/ and refimpl/.

Statically (every module parsed with ast, nothing imported): the project's import graph has no
cycle; oracles/ imports only downward (format < checking, authoring < engines < the command
line); refimpl/ never imports oracles/; and a project module is imported inside a function only
where LAZY below says why (an optional engine's own package may always be imported there).

Dynamically (in a fresh interpreter, so that what this test session has already imported does
not hide an import): reading and checking a suite never imports refimpl's forward pass (model,
mla, moe, mtp) or the authoring layer; writing one does."""

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("refimpl", "oracles")

# What each part of oracles/ may import from oracles/ (its own sub-package always).  The
# top-level modules (cli, __main__, and the old names kept for --adapter: adapters, mutants,
# hf_adapter) may import every layer.
LAYERS = {
    "oracles": (),  # oracles/__init__.py: OraclesError, __version__
    "oracles.format": ("oracles",),
    "oracles.checking": ("oracles", "oracles.format"),
    "oracles.authoring": ("oracles", "oracles.format"),
    "oracles.engines": ("oracles", "oracles.format", "oracles.checking", "oracles.authoring"),
}
TOP = ("oracles.cli", "oracles.__main__", "oracles.adapters", "oracles.mutants", "oracles.hf_adapter",
       "oracles.pytest_plugin", "oracles.pytest_items")

# (importing module, imported project module) -> why it is imported inside a function
LAZY = {
    ("refimpl", "refimpl.model"): "`import refimpl` (the checker) must not load the forward pass",
    ("refimpl", "refimpl.layer"): "`import refimpl` (the checker) must not load the forward pass",
    ("refimpl", "refimpl.loader"): "`import refimpl` (the checker) must not load the forward pass",
    ("oracles.cli", "oracles.authoring.suites"): "`oracles check` must not load the forward pass",
    ("oracles.cli", "oracles.authoring.writer"): "`oracles check` must not load the forward pass",
    ("oracles.cli", "oracles.authoring.conditioned"):
        "`oracles check --no-conditioning` (and a suite read without a conditioner) must not load "
        "the forward pass",
    ("oracles.__main__", "oracles.cli"): "the adapter's process starts before cli imports numpy",
    ("oracles.cli", "oracles.authoring.search"): "`oracles check` must not load the forward pass",
    ("oracles.cli", "oracles.authoring.verify"): "`oracles check` must not load the forward pass",
    ("oracles.pytest_plugin", "oracles.pytest_items"):
        "every pytest run in the environment loads the plugin: the checker only with --oracles-golden",
    ("oracles.cli", "oracles.authoring.checkpoint_cases"): "`oracles check` must not load the forward pass",
}

FORWARD = ("refimpl.model", "refimpl.layer", "refimpl.mla", "refimpl.moe", "refimpl.mtp")

CHECK_A_SUITE = """
import json, sys
from oracles.checking.candidates import DirCandidate
from oracles.checking.check import run_check
from oracles.format.golden import Golden
from refimpl.writer import write_safetensors
import oracles.checking.candidates, oracles.format.metrics, oracles.format.tolerances, oracles.cli, refimpl
golden_dir, cand = sys.argv[1], sys.argv[2]
g = Golden(golden_dir)
for cid in g.cases:  # the expected values as a candidate's files
    write_safetensors(f"{cand}/cases/{cid}/outputs.safetensors",
                      {k: v for k, v in g.expected(cid).items() if not k.endswith("_margin")})
    g.load_case(cid)
rep = run_check(golden_dir, DirCandidate(cand), "float32")
print(json.dumps({"counts": rep["counts"], "modules": sorted(sys.modules)}))
"""


# ---- the static graph ---------------------------------------------------------------------------

def _modules() -> dict:
    """module name -> its file, for every module under refimpl/ and oracles/."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str, known) -> list:
    """[(imported project module, at module level?, line)] of one module."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    top = {id(n) for n in tree.body}
    # a package's own name is its __init__; a module's package is its name less the last part
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            # `from pkg import mod` imports the module pkg.mod when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import refimpl.config` -> refimpl.config; a.b.attr -> a.b
                t = t.rpartition(".")[0]
            if t and t.split(".")[0] in PACKAGES:
                out.append((t, id(node) in top, node.lineno))
    return out


def import_graph():
    """-> ({module: {imported module: line}} of module-level imports, [(module, imported, line)]
    of imports inside functions)."""
    mods = _modules()
    graph, lazy = {}, []
    for name, path in mods.items():
        graph[name] = {}
        for target, at_top, line in _imports(name, path, mods):
            if target == name:
                continue
            if at_top:
                graph[name].setdefault(target, line)
            else:
                lazy.append((name, target, line))
    return graph, lazy


def cycles(graph: dict) -> list:
    """Every module that lies on an import cycle, with one cycle through it (Tarjan-free: a DFS
    per module is plenty for ~80 modules)."""
    found = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    found.append(path + [start])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def _layer(module: str) -> str | None:
    """The LAYERS key of an oracles module (None for TOP modules and refimpl)."""
    if module in TOP or not module.startswith("oracles"):
        return None
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or module in LAYERS else "oracles"


def layering_violations(graph: dict) -> list:
    bad = []
    for mod, targets in graph.items():
        for t, line in targets.items():
            if mod.startswith("refimpl") and t.startswith("oracles"):
                bad.append(f"{mod}:{line} imports {t}: refimpl never imports oracles")
            layer, other = _layer(mod), _layer(t)
            if layer is None or not t.startswith("oracles"):
                continue
            if t in TOP:
                bad.append(f"{mod}:{line} imports {t}, a top-level module")
            elif other != layer and other not in LAYERS[layer]:
                bad.append(f"{mod}:{line} ({layer}) imports {t} ({other}): an upward or sideways import")
    return bad


def test_the_import_graph_has_no_cycle():
    graph, _ = import_graph()
    assert len(graph) > 60  # both packages were found
    assert not cycles(graph), [" -> ".join(c) for c in cycles(graph)]


def test_oracles_imports_only_downward_and_refimpl_never_imports_oracles():
    graph, _ = import_graph()
    assert not layering_violations(graph)


def test_a_function_level_import_of_the_project_is_a_listed_lazy_load():
    _, lazy = import_graph()
    unlisted = [f"{m}:{line} imports {t}" for m, t, line in lazy if (m, t) not in LAZY]
    assert not unlisted, unlisted
    # and every listed one still exists (the list does not outlive the code)
    assert {(m, t) for m, t, _ in lazy} == set(LAZY)


def test_the_static_checks_can_fail():
    """Cycles, upward imports, refimpl importing oracles: each is seen."""
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == [["a", "b", "c", "a"],
                                                                   ["b", "c", "a", "b"],
                                                                   ["c", "a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []
    bad = layering_violations({"oracles.format.golden": {"oracles.authoring.writer": 3},
                               "oracles.checking.check": {"oracles.authoring.cases": 4},
                               "oracles.authoring.writer": {"oracles.checking.check": 5},
                               "oracles.engines.matrix": {"oracles.cli": 6},
                               "refimpl.model": {"oracles.format.schema": 7},
                               "oracles.authoring.emulate": {"oracles.format.schema": 8}})
    assert len(bad) == 5 and not any("emulate" in b for b in bad), bad


@pytest.mark.parametrize("source, expected", [
    ("from . import layer, mla\n", ["refimpl.layer", "refimpl.mla"]),
    ("from .layout import DTYPES\nimport refimpl.config\n", ["refimpl.layout", "refimpl.config"]),
    ("def f():\n    from .model import Model\n", ["refimpl.model"]),
])
def test_the_parser_resolves_relative_and_absolute_imports(tmp_path, source, expected):
    p = tmp_path / "m.py"
    p.write_text(source)
    known = _modules()
    assert [t for t, _, _ in _imports("refimpl.m", str(p), known)] == expected


# ---- what loads ---------------------------------------------------------------------------------

def _run(code, *args):
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_reading_and_checking_a_suite_never_imports_the_forward_pass(default_dir, tmp_path):
    cand = tmp_path / "cand"
    g = json.load(open(os.path.join(default_dir, "manifest.json")))
    for c in g["cases"]:
        os.makedirs(cand / "cases" / c["id"])
    out = _run(CHECK_A_SUITE, default_dir, str(cand))
    assert out["counts"]["pass"] == len(g["cases"]) and out["counts"]["fail"] == 0
    assert not [m for m in FORWARD if m in out["modules"]]
    assert not [m for m in out["modules"] if m.startswith("oracles.authoring")]
    shutil.rmtree(cand)


def test_writing_a_suite_does_import_it(tmp_path):
    """The check above can fail: the writing side pulls the forward pass in."""
    out = _run("import json, sys; from oracles.authoring import writer; "
               "writer.generate(sys.argv[1], 'default', only='rms_norm.*'); "
               "print(json.dumps({'modules': sorted(sys.modules)}))", str(tmp_path / "g"))
    assert [m for m in FORWARD if m not in out["modules"]] == []
